from joey.cli import main

main()
