from joey_cli import main

main()
