"""The wire contract of ``esans.v1``, shared by both servers and both clients.

- :mod:`.messages`: the request, response and codebook-info types, the sampler-kind enum
  mapping, and their conversions to and from protobuf messages and JSON bodies;
- :mod:`.wire`: ``SampleNegativesResponse`` written and read straight from numpy buffers;
- :mod:`.tensors`: arrays as ``esans.v1.Tensor`` and as JSON;
- ``_proto``: the modules generated from ``proto/`` (``make proto``; never edited by hand).

The errors and their gRPC codes and HTTP statuses are :mod:`esans_sampler.errors`, since the
core raises them too. Nothing here does I/O.
"""
