"""The on-device training model: a .tflite file that trains with TFLite builtin ops only.

A phone runtime without TensorFlow's Flex delegate (the standalone LiteRT, or an app
that will not ship Flex's many megabytes) refuses any TensorFlow op outside TFLite's
builtin set, and the gradients of Keras's Conv2D, pooling and most activations are such
ops (Conv2DBackprop*, MaxPoolGrad, AvgPoolGrad, ReluGrad, SigmoidGrad, TanhGrad...). So
the forward pass is rewritten from the Keras model's own layers in ops whose gradients
are builtin too.

The layer set (``unsupported_layer`` names the first layer outside it, without
converting; the rewrite refuses it with the same line):

- ``Conv2D``: any kernel size (odd or even, non-square), any strides, padding ``same``
  or ``valid``, with or without bias; not dilated, not grouped, channels last. As
  im2col: the input padded as TensorFlow pads it (``same``: ``total // 2`` before, the
  rest after), each of the ``kh*kw`` kernel taps a ``tf.slice`` (for strides, of the
  input reshaped so that one stride phase is one index: a strided slice's gradient is
  not builtin, a slice's is a pad), concatenated on the channel axis, times the kernel
  reshaped to a matrix (gradients: pad, slice, reshape, split, matmul);
- ``Dense``, with or without bias (on rank > 2 inputs, on the last axis as Keras);
- ``MaxPooling2D`` and ``AveragePooling2D``: any pool size and strides, padding
  ``valid`` or ``same``, from the same window taps. Max folds the taps pairwise as
  ``a*m + b*(1-m)`` with ``m = a >= b`` held constant, which routes the gradient like
  MaxPoolGrad (to the window's first maximum); ``same`` pads with -1e30, which no real
  cell loses to. Average sums the taps and multiplies by 1/count, the count of real
  (not padded) cells under each window, as Keras divides;
- ``Flatten``, ``Reshape``; ``InputLayer`` is skipped;
- activations, as a layer's ``activation`` or as ``Activation``, ``ReLU`` (any
  ``max_value``, ``negative_slope``, ``threshold``), ``LeakyReLU``, ``ELU`` and
  ``Softmax`` (last axis) layers: relu, relu6, leaky relu, elu, selu, sigmoid, tanh,
  softmax, swish/silu, gelu (exact and tanh-approximate), hard sigmoid, linear. Each
  is masks and builtin arithmetic: ReLU as ``x * (x > 0)`` (ReluGrad's gradient);
  sigmoid as ``(m + (1-m)e) / (1+e)`` with ``e = exp(-|x|)`` (never overflows);
  tanh as ``sign(x) (1-e)/(1+e)`` with ``e = exp(-2|x|)``; exact gelu through erf by
  Abramowitz and Stegun's 7.1.26 (error below 1.5e-7); softmax shifted by its
  constant row maximum;
- ``Dropout`` (and its ``noise_shape``): in ``train``, a fresh mask from the builtin
  RANDOM_UNIFORM, kept where ``u >= rate`` and scaled by ``1/(1-rate)`` as Keras does;
  the identity in ``infer``.

Only a chain of layers is rewritten: a Sequential model, or a functional one with one
input and one output whose every layer takes the previous layer's output (no branches,
no residual additions, no nested models).

Masks multiply rather than ``tf.where`` or ``tf.maximum`` select: those gradients take
a ``zeros_like`` of the activations, which the converter folds into constants as large
as every activation, and the file grew by megabytes.

The loss is one-hot times log-softmax, averaged over the examples a mask marks real.
The train signature takes a fixed batch (``batch_size`` rows, a mask for a partial
last batch), as the TFLite converter needs static shapes for the rewritten ops, and
the client optimizer's hyper-parameters (``learning_rate``, ``momentum``, ``prox_mu``:
the step ``edgefl.learner`` defines, SGD with momentum and FedProx's proximal term).
The weights are resource variables, read and written through ``get_weights`` and
``set_weights`` in Keras's order and under the wire format's names (``/`` becomes
``__``: signature keys are identifiers; ``edgefl.litert`` holds that naming, which the
devices read by). Two more variables per trainable weight, the anchor (the weights
``set_weights`` was last given: the round's global weights) and the momentum
accumulator, live in the file only: ``set_weights`` sets the anchors and zeroes the
accumulators (a fresh file's first step ignores them, so an app may train without
calling ``set_weights`` first), ``get_weights`` returns the weights alone. Flex's checkpoint
save/restore has no builtin equivalent; an app keeps the ``get_weights`` outputs
instead.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

import numpy as np

from edgefl.litert import SIGNATURES, signature_key, wire_name
from edgefl.models import build_model, weight_names

LAYER_SET = (
    "Conv2D (any kernel, stride, padding), Dense, max/average pooling, Flatten, Reshape, the usual activations and Dropout"
)
_ACTIVATIONS = (
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "sigmoid",
    "tanh",
    "softmax",
    "swish",
    "silu",
    "gelu",
    "hard_sigmoid",
    "linear",
)
_MAX_POOL_PAD = -1e30
_SKIPPED = ("InputLayer",)
_REWRITTEN = (
    "Conv2D",
    "Dense",
    "MaxPooling2D",
    "AveragePooling2D",
    "Flatten",
    "Reshape",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "Softmax",
    "Dropout",
)


def _refusal(what: str) -> str:
    return f"{what}; LiteRT devices train {LAYER_SET}"


# Keywords a ``functools.partial`` of an activation may bind (``partial(gelu, approximate=True)``).
_PARTIAL_KEYWORDS = {"gelu": {"approximate"}, "leaky_relu": {"alpha"}, "elu": {"alpha"}}


def _activation_name(layer) -> str | None:
    """The name of a layer's activation function; a partial's as ``name(keywords)``
    unless its keywords are ones the rewrite takes."""
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    if isinstance(activation, functools.partial):
        name = getattr(activation.func, "__name__", "partial")
        if activation.args or not set(activation.keywords) <= _PARTIAL_KEYWORDS.get(name, set()):
            return f"{name}({', '.join(map(str, activation.keywords))})"
        return name
    return getattr(activation, "__name__", type(activation).__name__)


def _activation_keywords(layer) -> dict:
    activation = getattr(layer, "activation", None)
    return dict(activation.keywords) if isinstance(activation, functools.partial) else {}


def _layer_problem(layer) -> str | None:
    """Why one layer has no rewrite (a phrase after its name), or None."""
    kind = type(layer).__name__
    if kind in _SKIPPED:
        return None
    if kind not in _REWRITTEN:
        if getattr(layer, "layers", None) is not None:
            return "is a nested model, which is not rewritten"
        return "has no on-device rewrite"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"is {layer.data_format}; only channels_last is rewritten"
    if kind == "Conv2D":
        if tuple(layer.dilation_rate) != (1, 1):
            return f"is dilated (dilation_rate {tuple(layer.dilation_rate)}); only dilation 1 is rewritten"
        if getattr(layer, "groups", 1) != 1:
            return f"is a grouped convolution (groups={layer.groups}); only groups=1 is rewritten"
    if kind in ("Conv2D", "MaxPooling2D", "AveragePooling2D") and layer.padding not in ("same", "valid"):
        return f"has padding {layer.padding!r}; only 'same' and 'valid' are rewritten"
    if kind == "Softmax" and layer.axis not in (-1, [-1]):
        return f"takes softmax over axis {layer.axis}; only the last axis is rewritten"
    name = _activation_name(layer) if kind in ("Conv2D", "Dense", "Activation") else None
    if name is not None and name not in _ACTIVATIONS:
        return f"has activation {name!r}, which has no on-device rewrite"
    return None


def _chain(model) -> tuple[list, str | None]:
    """The model's layers in order if they form a chain, else why not (a full line)."""
    layers = list(model.layers)
    kind = type(model).__name__
    if kind == "Sequential":
        return layers, None
    if not getattr(model, "_is_graph_network", False):
        return layers, _refusal(f"model {model.name!r} ({kind}) is a subclassed model, not a chain of layers")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return layers, _refusal(f"model {model.name!r} is not a chain of layers (it has several inputs or outputs)")
    previous = None
    for layer in layers:
        try:
            given = layer.input
        except AttributeError:  # a layer called more than once
            return layers, _refusal(f"model {model.name!r} is not a chain of layers: layer {layer.name!r} is used twice")
        if isinstance(given, (list, tuple, dict)):
            return layers, _refusal(
                f"model {model.name!r} is not a chain of layers: layer {layer.name!r} ({type(layer).__name__}) takes"
                f" {len(given)} inputs"
            )
        if previous is not None and given is not previous.output:
            return layers, _refusal(
                f"model {model.name!r} is not a chain of layers: layer {layer.name!r} does not take {previous.name!r}'s output"
            )
        previous = layer
    if previous is None or previous.output is not model.outputs[0]:
        return layers, _refusal(f"model {model.name!r} is not a chain of layers: its output is not its last layer's")
    return layers, None


def unsupported_layer(model) -> str | None:
    """One line naming the first part of a Keras ``model`` outside the on-device layer
    set and why; None when every layer has a rewrite. Walks the model; converts nothing."""
    layers, problem = _chain(model)
    if problem:
        return problem
    for layer in layers:
        why = _layer_problem(layer)
        if why:
            return _refusal(f"layer {layer.name!r} ({type(layer).__name__}) {why}")
    for name in weight_names(model):  # the file's signature keys carry them ("/" as "__"), and back
        if wire_name(signature_key(name)) != name or not re.fullmatch(r"[A-Za-z0-9_./]+", name):
            layer = name.rsplit("/", 1)[0]
            return (
                f"layer {layer!r} has a name the training file's signature keys cannot carry (weight {name!r}); LiteRT"
                " devices need layer names of letters, digits, '.' and single '_' that do not end in '_'"
            )
    return None


def _output_size(size: int, window: int, stride: int, padding: str) -> tuple[int, int, int]:
    """Output length and the padding before and after, as TensorFlow computes them."""
    if padding == "valid":
        return (size - window) // stride + 1, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return out, total // 2, total - total // 2


def _window_counts(size: int, window: int, stride: int, padding: str) -> np.ndarray:
    """How many real (unpadded) cells each output position's window covers, on one axis."""
    out, before, _ = _output_size(size, window, stride, padding)
    starts = np.arange(out) * stride - before
    return np.minimum(starts + window, size) - np.maximum(starts, 0)


def _activation(tf, name: str, **params):
    """``name``'s function in builtin ops whose gradients are builtin."""

    def constant_mask(condition):
        return tf.stop_gradient(tf.cast(condition, tf.float32))

    def relu(x):
        return x * constant_mask(x > 0)

    def general_relu(x, max_value=None, negative_slope=0.0, threshold=0.0):
        # Keras's ReLU: max_value above it, x from threshold up, slope * (x - threshold) below.
        middle = constant_mask(x > threshold)
        y = x * middle
        if max_value is not None:
            top = constant_mask(x >= max_value)
            y = y * (1.0 - top) + max_value * top
        if negative_slope:
            y = y + negative_slope * (x - threshold) * (1.0 - middle)
        return y

    def sign_and_abs(x):
        positive = constant_mask(x >= 0)
        sign = 2.0 * positive - 1.0
        return positive, sign, x * sign

    def sigmoid(x):
        positive, _, magnitude = sign_and_abs(x)
        e = tf.exp(-magnitude)
        return (positive + (1.0 - positive) * e) / (1.0 + e)

    def tanh(x):
        _, sign, magnitude = sign_and_abs(x)
        e = tf.exp(-2.0 * magnitude)
        return sign * (1.0 - e) / (1.0 + e)

    def elu(x, alpha=1.0):
        positive = constant_mask(x > 0)
        return x * positive + alpha * (tf.exp(x * (1.0 - positive)) - 1.0) * (1.0 - positive)

    def erf(x):
        _, sign, magnitude = sign_and_abs(x)
        t = 1.0 / (1.0 + 0.3275911 * magnitude)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        return sign * (1.0 - poly * tf.exp(-magnitude * magnitude))

    def gelu(x, approximate=False):
        if approximate:
            return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
        return 0.5 * x * (1.0 + erf(x * 0.7071067811865476))

    def softmax(x):
        shifted = x - tf.stop_gradient(tf.reduce_max(x, axis=-1, keepdims=True))
        e = tf.exp(shifted)
        return e / tf.reduce_sum(e, axis=-1, keepdims=True)

    def hard_sigmoid(x):
        # Keras 2: clip(0.2 x + 0.5, 0, 1).
        y = 0.2 * x + 0.5
        inside = constant_mask(y > 0) * constant_mask(y < 1)
        return y * inside + constant_mask(y >= 1)

    table = {
        "relu": lambda x: general_relu(x, **params) if params else relu(x),
        "relu6": lambda x: general_relu(x, max_value=6.0),
        "leaky_relu": lambda x: general_relu(x, negative_slope=params.get("alpha", 0.2)),
        "elu": lambda x: elu(x, params.get("alpha", 1.0)),
        "selu": lambda x: 1.0507009873554805 * elu(x, 1.6732632423543772),
        "sigmoid": sigmoid,
        "tanh": tanh,
        "softmax": softmax,
        "swish": lambda x: x * sigmoid(x),
        "silu": lambda x: x * sigmoid(x),
        "gelu": lambda x: gelu(x, params.get("approximate", False)),
        "hard_sigmoid": hard_sigmoid,
        "linear": lambda x: x,
    }
    return table[name]


def _builtin_forward(tf, layers, variables: dict, *, train_dropout: bool = True):
    """A function of a batch (and ``training``) computing the chain of ``layers``'s
    logits from ``variables`` (the module's variable for each Keras variable's id), in
    ops that, with their gradients, are TFLite builtins."""

    def larger(a, b):
        first = tf.stop_gradient(tf.cast(a >= b, tf.float32))
        return a * first + b * (1.0 - first)

    def windows(x, size, strides, padding, pad_value=0.0):
        """Every window's ``kh*kw`` taps, each ``[batch, out_h, out_w, channels]``, in
        row-major order within the window."""
        (kh, kw), (sh, sw) = size, strides
        batch, height, width, channels = x.shape
        out_h, top, bottom = _output_size(height, kh, sh, padding)
        out_w, left, right = _output_size(width, kw, sw, padding)
        # Tap (i, j) reads rows i + r*sh: with the rows grouped by stride phase, row
        # (i // sh + r, i % sh) of a [rows_q, sh] grid. Pad the end so the grid is whole.
        rows_q = max(-(-(height + top + bottom) // sh), (kh - 1) // sh + out_h)
        cols_q = max(-(-(width + left + right) // sw), (kw - 1) // sw + out_w)
        bottom += rows_q * sh - (height + top + bottom)
        right += cols_q * sw - (width + left + right)
        if top or bottom or left or right:
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=pad_value)
        if sh == 1 and sw == 1:
            return [tf.slice(x, [0, i, j, 0], [batch, out_h, out_w, channels]) for i in range(kh) for j in range(kw)]
        by_row_phase = tf.reshape(x, [batch, rows_q, sh, cols_q * sw * channels])
        taps = []
        for i in range(kh):
            rows = tf.slice(by_row_phase, [0, i // sh, i % sh, 0], [batch, out_h, 1, cols_q * sw * channels])
            by_column_phase = tf.reshape(rows, [batch, out_h, cols_q, sw * channels])
            for j in range(kw):
                taps.append(tf.slice(by_column_phase, [0, 0, j // sw, (j % sw) * channels], [batch, out_h, out_w, channels]))
        return taps

    def conv(layer, x):
        kernel = variables[id(layer.kernel)]
        kh, kw, c_in, c_out = kernel.shape
        taps = windows(x, (kh, kw), layer.strides, layer.padding)
        batch, out_h, out_w, _ = taps[0].shape
        patches = tf.concat(taps, axis=3) if len(taps) > 1 else taps[0]
        columns = tf.reshape(patches, [batch * out_h * out_w, kh * kw * c_in])
        out = tf.matmul(columns, tf.reshape(kernel, [kh * kw * c_in, c_out]))
        if layer.use_bias:
            out = out + variables[id(layer.bias)]
        return tf.reshape(out, [batch, out_h, out_w, c_out])

    def dense(layer, x):
        shape = x.shape
        flat = tf.reshape(x, [-1, shape[-1]]) if len(shape) > 2 else x
        out = tf.matmul(flat, variables[id(layer.kernel)])
        if layer.use_bias:
            out = out + variables[id(layer.bias)]
        return tf.reshape(out, [*shape[:-1], out.shape[-1]]) if len(shape) > 2 else out

    def max_pool(layer, x):
        taps = windows(x, layer.pool_size, layer.strides, layer.padding, _MAX_POOL_PAD)
        out = taps[0]
        for tap in taps[1:]:
            out = larger(out, tap)
        return out

    def average_pool(layer, x):
        taps = windows(x, layer.pool_size, layer.strides, layer.padding)
        (kh, kw), (sh, sw) = layer.pool_size, layer.strides
        rows = _window_counts(x.shape[1], kh, sh, layer.padding)
        cols = _window_counts(x.shape[2], kw, sw, layer.padding)
        total = tf.add_n(taps) if len(taps) > 1 else taps[0]
        if layer.padding == "valid" or (rows.min() == kh and cols.min() == kw):
            return total * (1.0 / (kh * kw))
        inverse = (1.0 / np.outer(rows, cols)).astype(np.float32)[None, :, :, None]
        return total * tf.constant(inverse)

    def dropout(layer, x, training):
        if not training or not train_dropout or not layer.rate:
            return x
        shape = list(x.shape)
        if layer.noise_shape is not None:
            shape = [given if given is not None else actual for given, actual in zip(layer.noise_shape, shape)]
        keep = tf.cast(tf.random.uniform(shape) >= layer.rate, tf.float32)
        return x * (1.0 / (1.0 - layer.rate)) * keep

    def activation_of(layer):
        return _activation(tf, _activation_name(layer), **_activation_keywords(layer))

    def forward(x, training: bool):
        for layer in layers:
            kind = type(layer).__name__
            if kind in _SKIPPED:
                continue
            if kind == "Conv2D":
                x = activation_of(layer)(conv(layer, x))
            elif kind == "Dense":
                x = activation_of(layer)(dense(layer, x))
            elif kind == "MaxPooling2D":
                x = max_pool(layer, x)
            elif kind == "AveragePooling2D":
                x = average_pool(layer, x)
            elif kind == "Flatten":
                x = tf.reshape(x, [x.shape[0], -1])
            elif kind == "Reshape":
                x = tf.reshape(x, [x.shape[0], *layer.target_shape])
            elif kind == "Activation":
                x = activation_of(layer)(x)
            elif kind == "ReLU":
                max_value = None if layer.max_value is None else float(layer.max_value)
                x = _activation(
                    tf,
                    "relu",
                    max_value=max_value,
                    negative_slope=float(layer.negative_slope),
                    threshold=float(layer.threshold),
                )(x)
            elif kind == "LeakyReLU":
                x = _activation(tf, "leaky_relu", alpha=float(layer.alpha))(x)
            elif kind == "ELU":
                x = _activation(tf, "elu", alpha=float(layer.alpha))(x)
            elif kind == "Softmax":
                x = _activation(tf, "softmax")(x)
            elif kind == "Dropout":
                x = dropout(layer, x, training)
            else:  # unsupported_layer let it through: a bug here, not the user's model
                raise AssertionError(f"no rewrite for {kind}")
        return x

    return forward


def training_module_for(tf, model, batch_size: int, *, train_dropout: bool = True):
    """A ``tf.Module`` with the four signatures for a Keras ``model`` (its current
    weights are the file's initial ones); ``train_dropout=False`` makes ``train``'s
    Dropout the identity (export's check against Keras, which cannot draw the same
    masks). Raises ValueError (``unsupported_layer``'s line) outside the layer set."""
    problem = unsupported_layer(model)
    if problem:
        raise ValueError(problem)
    layers, _ = _chain(model)
    names = weight_names(model)
    trainable_ids = {id(v) for v in model.trainable_weights}
    initial = model.get_weights()
    batch_shape = [batch_size, *model.input_shape[1:]]
    num_classes = model.output_shape[-1]

    class OnDeviceTraining(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights = [tf.Variable(w, name=signature_key(n)) for n, w in zip(names, initial)]
            trained = [i for i, v in enumerate(model.weights) if id(v) in trainable_ids]
            self.trained_index = trained
            self.trained = [self.weights[i] for i in trained]
            self.anchors = [tf.Variable(initial[i], name=f"anchor_{i}") for i in trained]
            # The accumulators start as copies of the weights, not as zeros: the
            # converter stores one buffer for equal initial values, and a file's zeros
            # would double its size. ``momentum_on`` (0 in a fresh file, 1 once a step
            # or set_weights ran) keeps those copies out of the first step.
            self.accumulators = [tf.Variable(initial[i], name=f"accumulator_{i}") for i in trained]
            self.momentum_on = tf.Variable(0.0, name="momentum_on")
            self.forward = _builtin_forward(
                tf, layers, {id(k): v for k, v in zip(model.weights, self.weights)}, train_dropout=train_dropout
            )

        @tf.function(
            input_signature=[
                tf.TensorSpec(batch_shape, tf.float32, name="x"),
                tf.TensorSpec([batch_size], tf.int32, name="y"),
                tf.TensorSpec([batch_size], tf.float32, name="mask"),
                tf.TensorSpec([], tf.float32, name="learning_rate"),
                tf.TensorSpec([], tf.float32, name="momentum"),
                tf.TensorSpec([], tf.float32, name="prox_mu"),
            ]
        )
        def train(self, x, y, mask, learning_rate, momentum, prox_mu):
            """One step on the rows ``mask`` marks, of SGD with momentum on the loss plus
            FedProx's proximal term (``edgefl.learner``'s step); the mean loss and the
            number of correct predictions over those rows, before the step."""
            with tf.GradientTape() as tape:
                logits = self.forward(x, True)
                per_example = -tf.reduce_sum(tf.one_hot(y, num_classes) * tf.nn.log_softmax(logits), axis=1)
                loss = tf.reduce_sum(per_example * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
            gradients = tape.gradient(loss, self.trained)
            kept = momentum * self.momentum_on
            for variable, gradient, anchor, accumulator in zip(self.trained, gradients, self.anchors, self.accumulators):
                step = kept * accumulator + (gradient + prox_mu * (variable - anchor))
                accumulator.assign(step)
                variable.assign_sub(learning_rate * step)
            self.momentum_on.assign(1.0)
            hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32)
            return {"loss": loss, "correct": tf.reduce_sum(hits * mask)}

        @tf.function(input_signature=[tf.TensorSpec(batch_shape, tf.float32, name="x")])
        def infer(self, x):
            return {"logits": self.forward(x, False)}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {v.name.split(":")[0]: tf.identity(v) for v in self.weights}

        @tf.function(input_signature=[tf.TensorSpec(w.shape, tf.float32, name=signature_key(n)) for n, w in zip(names, initial)])
        def set_weights(self, *values):
            """The weights, and (for a client update's start) the anchors; zeroed
            accumulators (the given weights times 0, finite as the wire checks them:
            ``zeros_like`` of a static shape is folded into a stored constant)."""
            for variable, value in zip(self.weights, values):
                variable.assign(value)
            for i, anchor, accumulator in zip(self.trained_index, self.anchors, self.accumulators):
                anchor.assign(values[i])
                accumulator.assign(values[i] * 0.0)
            self.momentum_on.assign(1.0)
            return {"parameters": tf.constant(sum(int(v.shape.num_elements()) for v in self.weights))}

    return OnDeviceTraining()


def build_training_module(tf, model_name: str, dataset: str, batch_size: int, initial_weights=None):
    """A ``tf.Module`` with the four signatures, starting from ``initial_weights``
    (Keras order) or a fresh model's."""
    model = build_model(model_name, dataset)
    if initial_weights is not None:
        model.set_weights(list(initial_weights))
    return training_module_for(tf, model, batch_size)


def convert_module(module) -> bytes:
    """A training module as a .tflite, converted with TFLite's builtin op set only: the
    conversion fails rather than fall back to Flex."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        tf.saved_model.save(module, str(saved), signatures={name: getattr(module, name) for name in SIGNATURES})
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return converter.convert()


def convert_keras_training_model(model, batch_size: int, *, train_dropout: bool = True) -> bytes:
    """The trainable .tflite of a Keras ``model`` from its current weights."""
    import tensorflow as tf

    return convert_module(training_module_for(tf, model, batch_size, train_dropout=train_dropout))


def convert_training_model(
    model_name: str, dataset: str, batch_size: int, initial_weights=None, *, train_dropout: bool = True
) -> bytes:
    """The trainable .tflite of a model reference, from ``initial_weights`` (Keras
    order) or a fresh model's."""
    import tensorflow as tf

    model = build_model(model_name, dataset)
    if initial_weights is not None:
        model.set_weights(list(initial_weights))
    return convert_module(training_module_for(tf, model, batch_size, train_dropout=train_dropout))
