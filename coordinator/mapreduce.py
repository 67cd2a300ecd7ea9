"""TFF computations compiled to MapReduce form and run as in-process TensorFlow.

TFF 0.87 executes federated computations only through its C++ ``worker_binary``, and
every value crosses into it as a protobuf: about 110 ms per CNN delta, and a cohort
past ~450 deltas overflows protobuf's 2 GB limit. TFF's own deployment path does
not run that executor: ``tff.backends.mapreduce`` compiles a round into plain
TensorFlow graphs (prepare, work, zero, accumulate, merge, report, update) that a
production server runs one update at a time. Those graphs are imported here into
``tf.function``s, so an aggregator costs what its arithmetic costs (a few ms per
CNN delta), memory stays at one accumulator however large the cohort, and the
semantics remain exactly those of the TFF factories that were compiled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Leaf:
    """One tensor of a TFF type, named by its path in the structure."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype


def leaves(tff_type: Any, prefix: str = "") -> list[Leaf]:
    """The tensors of a (non-federated) TFF type in TFF's flattening order."""
    import tensorflow_federated as tff

    if isinstance(tff_type, tff.FederatedType):
        return leaves(tff_type.member, prefix)
    if isinstance(tff_type, tff.TensorType):
        return [Leaf(prefix or "value", tuple(int(d) for d in tff_type.shape), np.dtype(tff_type.dtype))]
    if isinstance(tff_type, tff.StructType):
        found = []
        for i, (name, element) in enumerate(tff.structure.iter_elements(tff_type)):
            label = name if name is not None else str(i)
            found += leaves(element, f"{prefix}/{label}" if prefix else label)
        return found
    raise TypeError(f"only tensors and structures of tensors can be compiled, not {tff_type}")


def _binding_tensor_names(binding: Any) -> list[str]:
    kind = binding.WhichOneof("binding")
    if kind is None:
        return []
    if kind == "tensor":
        return [binding.tensor.tensor_name]
    if kind == "struct":
        return [name for element in binding.struct.element for name in _binding_tensor_names(element)]
    raise TypeError(f"a {kind} binding cannot be compiled to a tf.function")


class TensorFlowFunction:
    """A TFF TensorFlow computation as a ``tf.function`` of its flattened tensors.

    The computation's GraphDef is imported inside one traced function, so TF's graph
    optimiser sees the whole body (nested sub-computations included): importing it
    into a pruned ``wrap_function`` instead ran 10x slower.
    """

    def __init__(self, computation: Any):
        import tensorflow as tf
        import tensorflow_federated as tff

        proto = tff.framework.ConcreteComputation.get_proto(computation).tensorflow
        if proto.initialize_op:
            raise TypeError("computations with variables to initialise are not supported")
        graph_def = tf.compat.v1.GraphDef()
        proto.graph_def.Unpack(graph_def)
        parameter = computation.type_signature.parameter
        self.parameters = leaves(parameter) if parameter is not None else []
        self.results = leaves(computation.type_signature.result)
        inputs = _binding_tensor_names(proto.parameter) if proto.HasField("parameter") else []
        outputs = _binding_tensor_names(proto.result)
        # Grappler's constant folding leaves control inputs on the parameters' placeholders
        # (seen in SecureSumFactory's work); the values arrive through ``input_map``, so a
        # control input on a placeholder would only demand a feed nothing gives.
        bound = {name.split(":")[0] for name in inputs}
        for node in graph_def.node:
            if any(i.startswith("^") and i[1:] in bound for i in node.input):
                kept = [i for i in node.input if not (i.startswith("^") and i[1:] in bound)]
                del node.input[:]
                node.input.extend(kept)
        if len(inputs) != len(self.parameters) or len(outputs) != len(self.results):
            raise TypeError("the computation's bindings do not match its type signature")

        @tf.function(input_signature=[tf.TensorSpec(p.shape, p.dtype) for p in self.parameters])
        def call(*args):
            return tf.graph_util.import_graph_def(graph_def, input_map=dict(zip(inputs, args)), return_elements=outputs, name="")

        self._call = call
        self._tf = tf

    def __call__(self, *args: Any) -> list[Any]:
        """Tensors in, tensors out (numpy arrays are accepted as inputs)."""
        if len(args) != len(self.parameters):
            raise TypeError(f"expected {len(self.parameters)} tensors, got {len(args)}")
        tensors = [self._tf.convert_to_tensor(a, dtype=p.dtype) for a, p in zip(args, self.parameters)]
        return list(self._call(*tensors)) if self.results else []


class MapReduceRound:
    """A round ``(state@SERVER, client_data@CLIENTS) -> (state@SERVER, output@SERVER)``
    and its ``initialize`` as TFF's MapReduce form, every block an in-process function.

    The blocks follow ``tff.backends.mapreduce.MapReduceForm``: ``prepare`` turns the
    server state into what clients are sent, ``work`` maps one client's data to what is
    summed, ``zero``/``accumulate`` fold those, ``report`` finishes the fold and
    ``update`` produces the next state and the round's output. (``merge``, for folds
    made in several places, is not needed while one driver folds a round.)

    A round with secure sums (``federated_secure_sum_bitwidth``: TFF's
    ``SecureSumFactory``) has ``work`` emit, after the leaves it folds, the leaves
    those sums take; TFF routes them around the fold, and ``update`` takes their sums
    after ``report``'s output. They are summed by SecAgg+ between the devices
    (``edgefl.secagg``), never seen one by one; ``secure_bitwidths`` says how wide each
    is. Secure sums by maximum input or modulus are refused: nothing here emits them.
    """

    def __init__(self, initialize: Any, round_computation: Any):
        import tensorflow_federated as tff

        form = tff.backends.mapreduce.get_map_reduce_form_for_computation(round_computation)
        init = tff.backends.mapreduce.get_state_initialization_computation(initialize)
        self.initialize = TensorFlowFunction(init)
        self.prepare = TensorFlowFunction(form.prepare)
        self.work = TensorFlowFunction(form.work)
        self.zero = TensorFlowFunction(form.zero)
        self.accumulate = TensorFlowFunction(form.accumulate)
        self.report = TensorFlowFunction(form.report)
        self.update = TensorFlowFunction(form.update)
        if _constants(form.secure_sum_max_input) or _constants(form.secure_modular_sum_modulus):
            raise TypeError("secure sums by maximum input or modulus are not run here, only by bitwidth")
        self.folded = len(self.zero.results)  # work's leaves the fold takes; the rest are summed securely
        self.secure_bitwidths = tuple(int(b) for b in _constants(form.secure_sum_bitwidth))
        if len(self.work.results) != self.folded + len(self.secure_bitwidths):
            raise TypeError("work's results do not match the fold and the secure sums")
        self.state = leaves(round_computation.type_signature.parameter[0])
        self.outputs = self.update.results[len(self.state) :]  # the round's output leaves, named by path

    @property
    def secure_leaves(self) -> list[Leaf]:
        return self.work.results[self.folded :]

    def client_work(self, broadcast: Sequence[Any], client_data: Sequence[Any]) -> list[Any]:
        """TFF's work for one client: the leaves to fold, then those to sum securely."""
        return self.work(*client_data, *broadcast)

    def finish(
        self, state: Sequence[Any], accumulator: Sequence[Any], secure_sums: Sequence[Any] = ()
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``report`` then ``update`` (with the secure sums, if the round has any): the
        next state and the round's output, as numpy."""
        if len(secure_sums) != len(self.secure_bitwidths):
            raise ValueError(f"the round takes {len(self.secure_bitwidths)} secure sums, not {len(secure_sums)}")
        aggregate = self.report(*accumulator)
        sums = [np.asarray(x, leaf.dtype).reshape(leaf.shape) for x, leaf in zip(secure_sums, self.secure_leaves)]
        results = [np.asarray(r) for r in self.update(*state, *aggregate, *sums)]
        return results[: len(self.state)], results[len(self.state) :]


def _constants(computation: Any) -> list[Any]:
    """The leaves of a computation without parameters (a secure sum's bitwidths, say),
    computed in-process like every other block, never by TFF's executor."""
    return [np.asarray(x).item() for x in TensorFlowFunction(computation)()]
