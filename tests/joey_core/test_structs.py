from google.protobuf.struct_pb2 import Struct

from joey_core import structs


def test_whole_numbers_come_back_as_they_were_sent() -> None:
    sent = {"roll_rows": 100, "roll_seconds": 2.5, "nested": {"port": 9092, "ratios": [1, 0.5]}, "name": "x"}
    struct = Struct()
    struct.update(sent)
    back = structs.plain(struct)
    assert back == sent
    assert type(back["roll_rows"]) is int and type(back["nested"]["ratios"][1]) is float
