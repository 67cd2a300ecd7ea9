"""Secure aggregation (SecAgg+, Bell et al. 2020, on Bonawitz et al. 2017) as pure
functions: the devices' half and the coordinator's half of each phase, with no I/O.

A round's devices advertise two X25519 public keys, share their secrets with their
neighbours in a sparse random graph (Shamir shares, encrypted pairwise and routed
through the coordinator, which cannot read them), upload their input masked twice
(a self mask and one pairwise mask per neighbour, modulo 2^bits), and finally reveal,
for each neighbour, either the share of its self-mask seed (it survived) or the share
of its mask key (it dropped out), never both. The coordinator then removes the masks
and learns the sum of the survivors' inputs, and nothing else.

``crypto`` holds the primitives (pyca/cryptography: X25519, HKDF-SHA256, AES-GCM,
an AES-256-CTR keystream as the mask generator), ``shamir`` the threshold sharing
(over GF(2^521 - 1)), ``graph`` the neighbour graph, ``protocol`` the phases, and
``quantize`` the device's half of TFF's SecureSumFactory (its client shift, in numpy).
"""
