"""Protocol buffers: the client API (pie.proto). The *_pb2*.py files are generated (`make proto`); never edit them."""
