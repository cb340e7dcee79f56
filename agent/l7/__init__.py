"""L7 protocol parsers: one module per protocol, each turning the first bytes of a request and
of its response into a typed result, and never raising on garbage (a malformed frame is an
expected input with a defined result). Parse only: no I/O, no BPF, no metrics."""
