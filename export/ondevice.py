"""The on-device training model: a .tflite file that trains with TFLite builtin ops only.

A phone runtime without TensorFlow's Flex delegate (the standalone LiteRT, or an app
that will not ship Flex's many megabytes) refuses any TensorFlow op outside TFLite's
builtin set, and the gradients of Keras's Conv2D, MaxPool2D and ReLU are such ops
(Conv2DBackprop*, MaxPoolGrad, ReluGrad). So the forward pass is rewritten from the
Keras model's own layers in ops whose gradients are builtin too:

- a "same" convolution as im2col: ``k*k`` shifted ``tf.slice``s of the padded input
  concatenated on the channel axis, times the kernel reshaped to a matrix (gradients:
  pad, split, matmul);
- 2x2 max pooling as two picks between unstacked row and column pairs, ``a*m + b*(1-m)``
  with ``m = a >= b`` held constant, which routes the gradient like MaxPoolGrad except
  between exactly equal positive values;
- ReLU as ``x * (x > 0)``, whose gradient is ReluGrad's;
- the loss as one-hot times log-softmax, averaged over the examples a mask marks real.

Masks multiply rather than ``tf.where`` or ``tf.maximum`` select: those gradients take
a ``zeros_like`` of the activations, which the converter folds into constants as large
as every activation, and the file grew by megabytes.

The train signature takes a fixed batch (``batch_size`` rows, a mask for a partial
last batch), as the TFLite converter needs static shapes for the rewritten ops. The
weights are resource variables, read and written through ``get_weights`` and
``set_weights`` in Keras's order and under the wire format's names (``/`` becomes
``__``: signature keys are identifiers; ``edgefl.litert`` holds that naming, which the
devices read by). Flex's checkpoint save/restore has no builtin
equivalent; an app keeps the ``get_weights`` outputs instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgefl.litert import SIGNATURES, signature_key
from edgefl.models import INPUT_SHAPE, NUM_CLASSES, build_model, weight_names


def _builtin_forward(tf, model, variables: dict):
    """A function of a batch computing ``model``'s logits from ``variables`` (by wire
    name) in ops that, with their gradients, are TFLite builtins."""

    def relu(x):
        return x * tf.cast(x > 0, tf.float32)

    def larger(a, b):
        first = tf.stop_gradient(tf.cast(a >= b, tf.float32))
        return a * first + b * (1.0 - first)

    def conv_same(x, kernel, bias):
        k, _, c_in, c_out = kernel.shape
        batch, height, width, _ = x.shape
        pad = (k - 1) // 2
        padded = tf.pad(x, [[0, 0], [pad, k - 1 - pad], [pad, k - 1 - pad], [0, 0]])
        patches = tf.concat(
            [tf.slice(padded, [0, i, j, 0], [batch, height, width, c_in]) for i in range(k) for j in range(k)], axis=3
        )
        columns = tf.reshape(patches, [batch * height * width, k * k * c_in])
        out = tf.matmul(columns, tf.reshape(kernel, [k * k * c_in, c_out])) + bias
        return tf.reshape(out, [batch, height, width, c_out])

    def max_pool_2x2(x):
        batch, height, width, channels = x.shape
        rows = tf.unstack(tf.reshape(x, [batch * height // 2, 2, width * channels]), axis=1)
        x = larger(rows[0], rows[1])
        columns = tf.unstack(tf.reshape(x, [batch * height // 2 * width // 2, 2, channels]), axis=1)
        return tf.reshape(larger(columns[0], columns[1]), [batch, height // 2, width // 2, channels])

    activations = {"relu": relu, "linear": lambda x: x}

    def forward(x):
        for layer in model.layers:
            kind, name = type(layer).__name__, layer.name
            if kind == "Conv2D":
                if layer.padding != "same" or layer.strides != (1, 1) or layer.kernel_size[0] % 2 == 0:
                    raise ValueError(f"{name}: only stride-1 'same' convolutions with odd kernels are rewritten")
                x = activations[layer.activation.__name__](conv_same(x, variables[f"{name}/kernel"], variables[f"{name}/bias"]))
            elif kind == "MaxPooling2D":
                if layer.pool_size != (2, 2) or layer.strides != (2, 2):
                    raise ValueError(f"{name}: only 2x2 pooling with stride 2 is rewritten")
                x = max_pool_2x2(x)
            elif kind == "Flatten":
                x = tf.reshape(x, [x.shape[0], -1])
            elif kind == "Dense":
                x = activations[layer.activation.__name__](tf.matmul(x, variables[f"{name}/kernel"]) + variables[f"{name}/bias"])
            else:
                raise ValueError(f"{name}: no builtin-op rewrite for a {kind} layer")
        return x

    return forward


def build_training_module(tf, model_name: str, batch_size: int, initial_weights=None):
    """A ``tf.Module`` with the four signatures, starting from ``initial_weights``
    (Keras order) or a fresh model's."""
    model = build_model(model_name)
    if initial_weights is not None:
        model.set_weights(list(initial_weights))
    names = weight_names(model)
    batch_shape = [batch_size, *INPUT_SHAPE]

    class OnDeviceTraining(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights = [tf.Variable(w, name=signature_key(n)) for n, w in zip(names, model.get_weights())]
            self.forward = _builtin_forward(tf, model, dict(zip(names, self.weights)))

        @tf.function(
            input_signature=[
                tf.TensorSpec(batch_shape, tf.float32, name="x"),
                tf.TensorSpec([batch_size], tf.int32, name="y"),
                tf.TensorSpec([batch_size], tf.float32, name="mask"),
                tf.TensorSpec([], tf.float32, name="learning_rate"),
            ]
        )
        def train(self, x, y, mask, learning_rate):
            """One SGD step on the rows ``mask`` marks; the mean loss and the number of
            correct predictions over those rows, before the step."""
            with tf.GradientTape() as tape:
                logits = self.forward(x)
                per_example = -tf.reduce_sum(tf.one_hot(y, NUM_CLASSES) * tf.nn.log_softmax(logits), axis=1)
                loss = tf.reduce_sum(per_example * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
            for variable, gradient in zip(self.weights, tape.gradient(loss, self.weights)):
                variable.assign_sub(learning_rate * gradient)
            hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32)
            return {"loss": loss, "correct": tf.reduce_sum(hits * mask)}

        @tf.function(input_signature=[tf.TensorSpec(batch_shape, tf.float32, name="x")])
        def infer(self, x):
            return {"logits": self.forward(x)}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {v.name.split(":")[0]: tf.identity(v) for v in self.weights}

        @tf.function(
            input_signature=[
                tf.TensorSpec(w.shape, tf.float32, name=signature_key(n)) for n, w in zip(names, model.get_weights())
            ]
        )
        def set_weights(self, *values):
            for variable, value in zip(self.weights, values):
                variable.assign(value)
            return {"parameters": tf.constant(sum(int(v.shape.num_elements()) for v in self.weights))}

    return OnDeviceTraining()


def convert_training_model(model_name: str, batch_size: int, initial_weights=None) -> bytes:
    """The trainable .tflite, converted with TFLite's builtin op set only: the
    conversion fails rather than fall back to Flex."""
    import tensorflow as tf

    module = build_training_module(tf, model_name, batch_size, initial_weights)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        tf.saved_model.save(module, str(saved), signatures={name: getattr(module, name) for name in SIGNATURES})
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return converter.convert()
