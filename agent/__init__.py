"""edge-agent: runs signed, quantized models on edge devices and reports on them.

The sub-packages ``agent.protocol``, ``agent.drift``, ``agent.model``, ``agent.profiles`` and
``agent.statedir`` are the shared contracts: the fleet server imports them, and they import only the
standard library, numpy, ``cryptography`` and msgpack (see ``tests/test_architecture.py``).
"""

__version__ = "0.1.0"
