"""Export: every driver on a small trained model, run in its real runtime; the parity gate failing;
hashes; interrupted exports; the input contract each artefact declares.

One tiny model (resnet10t, 32 px, trained for a few seconds on generated photos) is exported once
for the module; MobileNetV3's own INT8 TFLite is checked for the full-integer property.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
from click.testing import CliRunner

from edge.bundle import BundleInvalid, input_contract_problems, sha256_file, verify
from edge.head import float32_bytes
from edge.runtimes import softmax
from pipeline import bundle as bundle_mod
from pipeline import data as data_mod
from pipeline import train as train_mod
from pipeline.cli import main
from pipeline.export import ARTEFACTS, driver, select
from pipeline.export import tflite as tflite_driver
from pipeline.validate import Thresholds, gate, parity


@pytest.fixture
def run_cache(exported, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRASHSORT_CACHE", str(exported["cache"]))


def val_inputs(exported) -> tuple[np.ndarray, np.ndarray]:
    manifest = exported["result"].manifest
    folder = data_mod.scan_folder(exported["root"] / "data")
    data = bundle_mod.load_export_data(folder, manifest.preprocess, 8, 3)
    return data.val_images, data.val_labels


def test_bundle_holds_every_artefact_and_matches_its_manifest(exported) -> None:
    result = exported["result"]
    assert result.failures == {}
    bundle = result.path
    assert bundle.name == "data-resnet10t-v1"
    manifest = verify(bundle)  # every sha256 and size matches
    assert [a["file"] for a in manifest["artefacts"]] == [a.file for a in ARTEFACTS]
    for entry in manifest["artefacts"]:
        assert (bundle / entry["file"]).stat().st_size == entry["bytes"]
        assert entry["val"]["count"] == len(exported["run"].metrics["per_class"]) * 4  # 4 val photos a class
    assert (bundle / "labels.txt").read_text().split() == [c["name"] for c in manifest["classes"]]
    golden = json.loads((bundle / "golden" / "expected.json").read_text())
    assert len(golden["images"]) == 6
    assert set(golden["artefacts"]) == {a.file for a in ARTEFACTS}
    assert all((bundle / "golden" / g["file"]).is_file() for g in golden["images"])
    report = (bundle / "report.md").read_text()
    assert all(a.file in report for a in ARTEFACTS)
    entries = {a["file"]: a for a in manifest["artefacts"]}
    assert set(entries["model_int8.pte"]["int8_candidate"]) == {"bias_corrected", "range_rule"}  # the one kept
    assert not list(bundle.parent.glob(".*")), "no staging folder left behind"


def test_every_artefact_agrees_with_pytorch_in_its_runtime(exported, run_cache) -> None:
    result = exported["result"]
    model, _ = train_mod.load_checkpoint(exported["run"].run_dir)
    images, labels = val_inputs(exported)
    from pipeline.evaluate import predict_probs

    reference = predict_probs(model, images)
    assert len(set(reference.argmax(1))) > 1, "the model must tell classes apart for agreement to mean anything"
    for entry in result.manifest.artefacts:
        logits = driver(entry["format"]).Runner(result.path / entry["file"])(images)
        agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
        if entry["precision"] == "fp32":
            assert agreement == 1.0, entry["file"]
            np.testing.assert_allclose(softmax(logits), reference, atol=1e-4)
        else:
            assert agreement >= 0.75, entry["file"]


def test_declared_inputs_match_the_manifest_contract(exported) -> None:
    manifest = exported["result"].manifest
    h, w = manifest.preprocess.size
    for entry in manifest.artefacts:
        assert input_contract_problems(entry, manifest.preprocess.size, manifest.num_classes) == [], entry["file"]
        (inp,), (out,) = entry["inputs"], entry["outputs"]
        assert [int(s) for s in inp["shape"]] == [1, h, w, 3]
        assert [int(s) for s in out["shape"]] == [1, manifest.num_classes]
    int8_tflite = next(a for a in manifest.artefacts if a["file"] == "model_int8.tflite")
    assert int8_tflite["inputs"][0]["dtype"] == "int8"
    assert int8_tflite["inputs"][0]["quantization"] == {"scale": 1.0, "zero_point": -128}
    # And the check itself catches what does not fit.
    wrong = {"inputs": [{"shape": [1, 3, h, w], "dtype": "float32", "quantization": None}],
             "outputs": [{"shape": [1, manifest.num_classes + 1]}]}
    problems = input_contract_problems(wrong, manifest.preprocess.size, manifest.num_classes)
    assert len(problems) == 3 and "input shape" in problems[0] and "one score per class" in problems[2]


def test_activation_range_ignores_an_outlier_photo() -> None:
    from pipeline.export.ranges import percentile_range

    maxs = [np.array([1.0, 2.0])] * 199 + [np.array([1000.0, 2.0])]
    mins = [np.array([0.0, -2.0])] * 200
    low, high = percentile_range(mins, maxs)
    np.testing.assert_allclose(high, [1.0, 2.0])
    np.testing.assert_allclose(low, [0.0, -2.0])


def test_onnx_int8_pins_the_pixels_and_keeps_the_weights_closer_to_float(
        exported, monkeypatch: pytest.MonkeyPatch) -> None:
    """The input's pixels are exact (scale 1, zero point -128), and of the 8-bit and 7-bit weight
    candidates the artefact is the one whose onnxruntime logits are closer to the float model's."""
    import onnx
    from onnx import numpy_helper

    from pipeline.export import onnx as onnx_driver

    model, _ = train_mod.load_checkpoint(exported["run"].run_dir)
    calibration, _ = val_inputs(exported)
    kls: list[float] = []
    measure = onnx_driver.mean_kl
    monkeypatch.setattr(onnx_driver, "mean_kl", lambda ref, probs: kls.append(measure(ref, probs)) or kls[-1])
    payload = onnx_driver.export(model, "int8", calibration)
    graph = onnx.load_from_string(payload).graph
    assert len(kls) == 2  # the 8-bit, then the 7-bit candidate

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    cast = next(n for n in graph.node if n.op_type == "Cast" and onnx_driver.INPUT_NAME in n.input)
    transpose = next(n for n in graph.node if n.op_type == "Transpose" and cast.output[0] in n.input)  # to NCHW
    pixels = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == transpose.output[0])
    assert float(values[pixels.input[1]]) == 1.0 and int(values[pixels.input[2]]) == -128

    largest = max(int(np.abs(v.astype(np.int32)).max()) for name, v in values.items()
                  if name.endswith("weight_quantized"))
    assert largest == (127 if kls[0] <= kls[1] else 64)
    assert onnx_driver.describe(payload) == {"weight_bits": 8 if kls[0] <= kls[1] else 7}  # the manifest's


def test_onnx_weight_bits_read_from_the_file(exported) -> None:
    """The manifest's weight_bits is what the INT8 file holds: 7 once its weights are cut to 7 bits."""
    import onnx
    from onnx import numpy_helper

    from pipeline.export import onnx as onnx_driver

    entry = next(a for a in exported["result"].manifest.artefacts if a["file"] == "model_int8.onnx")
    payload = (exported["result"].path / entry["file"]).read_bytes()
    assert entry["weight_bits"] == onnx_driver.describe(payload)["weight_bits"]
    fp32 = (exported["result"].path / "model_fp32.onnx").read_bytes()
    assert onnx_driver.describe(fp32) == {}

    model = onnx.load_from_string(payload)
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for tensor in model.graph.initializer:
        if tensor.name in weights and tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) > 1:
            halved = (numpy_helper.to_array(tensor).astype(np.int32) // 2).astype(np.int8)
            tensor.CopyFrom(numpy_helper.from_array(halved, tensor.name))
    assert onnx_driver.describe(model.SerializeToString()) == {"weight_bits": 7}


def test_mobilenetv3_int8_tflite_is_full_integer(tiny_data: Path) -> None:
    from pipeline.model import ContractModel, create_model, preprocess_for

    model, _ = create_model("mobilenetv3_small", 3, pretrained=False)
    pre = preprocess_for(model, size=32)
    folder = data_mod.scan_folder(tiny_data)
    decoded = data_mod.decode_split(folder.split("train"), pre.resize_shorter_to, crop=32)
    calibration = np.ascontiguousarray(data_mod.center_crops(decoded.images, 32))
    flatbuffer = tflite_driver.export(ContractModel(model.eval(), pre), "int8", calibration)
    assert "float32" not in tflite_driver.tensor_types(flatbuffer)
    assert tflite_driver.tensor_types(flatbuffer) <= {"int8", "int32"}


def dead_channel_model():
    """A conv whose output channel 0 has all-zero weights (as training leaves some) and bias 2, read
    strongly by the classifier; with photos and its float logits."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the contract: uint8 NHWC in
            x = x.permute(0, 3, 1, 2).float() / 255
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.conv.weight[0] = 0
        model.conv.bias[0] = 2.0
        model.fc.weight[:, 0] = torch.tensor([3.0, -3.0, 0.0])
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    return model, images, expected


@pytest.mark.parametrize("fmt", ["executorch", "tflite", "onnx"])
def test_int8_keeps_the_bias_of_a_channel_with_all_zero_weights(fmt: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, images, expected = dead_channel_model()
    fmt_driver = driver(fmt)

    def int8_error() -> float:
        path = tmp_path / f"tiny.{fmt}"
        path.write_bytes(fmt_driver.export(model, "int8", images))
        return float(np.abs(fmt_driver.Runner(path)(images) - expected).max())

    assert int8_error() < 0.2
    if fmt == "tflite":  # ai-edge-quantizer's own bias for that channel overflows int32
        monkeypatch.setattr(tflite_driver, "_requantize_dead_channels", lambda _float, quantized: quantized)
        assert int8_error() > 1.0


@pytest.mark.parametrize(("fmt", "grids"), [("executorch", [127]), ("tflite", [127]), ("onnx", [127, 64])])
def test_int8_drivers_quantize_the_bias_corrected_model(fmt: str, grids: list[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8 quantizes the model bias-corrected for the driver's weight grid (ExecuTorch: as one of
    its candidates; onnxruntime: each weight-bit candidate for its own grid); fp32 never."""
    from pipeline.export.bias_correction import bias_corrected

    model, images, _ = dead_channel_model()
    fmt_driver = driver(fmt)
    calls: list[int] = []

    def recorded(model, calibration, levels=127):
        calls.append(levels)
        return bias_corrected(model, calibration, levels)

    monkeypatch.setattr(fmt_driver, "bias_corrected", recorded)
    fmt_driver.export(model, "fp32", images)
    assert calls == []
    fmt_driver.export(model, "int8", images)
    assert calls == grids


@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_new_head_written_into_an_fp32_artefact_equals_a_conversion(fmt: str, exported, run_cache,
                                                                    tmp_path: Path) -> None:
    """A head change reuses the converted graph: the classifier's weights (any class count) are
    written into it, and it computes what PyTorch computes with that head, also when written again."""
    import torch

    from pipeline.head import install_head

    result = exported["result"]
    fmt_driver = driver(fmt)
    model, manifest = train_mod.load_checkpoint(exported["run"].run_dir)
    images, _ = val_inputs(exported)
    suffix = {"tflite": "tflite", "executorch": "pte"}[fmt]
    converted = (result.path / f"model_fp32.{suffix}").read_bytes()
    features = model.model.get_classifier().in_features
    torch.manual_seed(0)
    weight, bias = torch.randn(manifest.num_classes + 2, features) * 0.1, torch.randn(manifest.num_classes + 2)
    install_head(model, weight, bias)
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()

    path = tmp_path / f"head.{suffix}"
    path.write_bytes(fmt_driver.with_new_head(converted, weight.numpy(), bias.numpy()))
    runner = fmt_driver.Runner(path)
    assert runner.io["outputs"][0]["shape"] == [1, manifest.num_classes + 2]
    np.testing.assert_allclose(runner(images), reference, rtol=1e-4, atol=1e-4)
    # again on the result (a second head change): back to the exported head, the exported file
    original, _ = train_mod.load_checkpoint(exported["run"].run_dir)
    back = original.model.get_classifier()
    path.write_bytes(fmt_driver.with_new_head(path.read_bytes(), back.weight.detach().numpy(),
                                              back.bias.detach().numpy()))
    np.testing.assert_allclose(fmt_driver.Runner(path)(images),
                               fmt_driver.Runner(result.path / f"model_fp32.{suffix}")(images), rtol=0, atol=0)
    if fmt == "executorch":  # the replaced head's data is dropped; the export's own head: its own bytes
        assert float32_bytes(weight.numpy()) not in path.read_bytes()
        own = back.weight.detach().numpy(), back.bias.detach().numpy()
        assert fmt_driver.with_new_head(converted, *own) == converted

    assert fmt_driver.with_new_head(converted, np.zeros((5, features + 1), np.float32),
                                    np.zeros(5, np.float32)) is None  # a head that does not fit
    if fmt == "tflite":
        from ai_edge_litert.tools import flatbuffer_utils

        # a converter drops an all-zero bias: no bias tensor to write into, so the export converts again
        dropped = flatbuffer_utils.read_model_from_bytearray(bytearray(converted))
        dropped.subgraphs[0].operators[-1].inputs[2] = -1
        without_bias = bytes(flatbuffer_utils.convert_object_to_bytearray(dropped))
        assert fmt_driver.with_new_head(without_bias, weight.numpy(), bias.numpy()) is None


def int8_classifier(fmt: str, payload: bytes) -> tuple[np.ndarray, ...]:
    """The last layer of an INT8 artefact: int8 weight, its scales, int32 bias, its scales, the
    logits' scale."""
    if fmt == "executorch":
        from pipeline.export import xnnpack_head

        head = xnnpack_head.read_head(payload)
        return (np.frombuffer(head.weight, np.int8), np.frombuffer(head.weight_scale, "<f4"),
                np.frombuffer(head.bias, "<i4"), np.frombuffer(head.bias_scale, "<f4"),
                head.output_quantization[0])
    if fmt == "tflite":
        from ai_edge_litert.tools import flatbuffer_utils

        tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(payload))
        graph = tflite.subgraphs[0]
        w, b, y = (graph.tensors[i] for i in (*graph.operators[-1].inputs[1:], graph.outputs[0]))
        return (tflite.buffers[w.buffer].data.view(np.int8), w.quantization.scale,
                tflite.buffers[b.buffer].data.view(np.int32), b.quantization.scale, y.quantization.scale)
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(payload).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    quantize = next(n for n in graph.node if gemm.output[0] in n.input)
    w, b = (producer[name].input for name in gemm.input[1:])
    return values[w[0]], values[w[1]], values[b[0]], values[b[1]], values[quantize.input[1]]


SUFFIXES = {"executorch": "pte", "tflite": "tflite", "onnx": "onnx"}


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "executorch"])
def test_new_head_written_into_an_int8_artefact_is_quantized_as_the_export_quantizes(fmt: str, exported,
                                                                                        run_cache) -> None:
    """A head change writes its classifier into the INT8 .tflite, .onnx and .pte too: the export's own
    head, with the export's calibration photos (and, .pte, the candidate its export kept), comes back
    as the conversion quantized it (bias correction, weight grid and bias scale the same; the logits'
    range from the embeddings instead of the converted graph); a head with another class count runs in
    the runtime like PyTorch's."""
    import torch

    from pipeline.head import embed, install_head

    result = exported["result"]
    fmt_driver = driver(fmt)
    model, manifest = train_mod.load_checkpoint(exported["run"].run_dir)
    _, cfg = train_mod.load_run_config(exported["run"].run_dir)
    folder = data_mod.scan_folder(exported["root"] / "data")
    data = bundle_mod.load_export_data(folder, manifest.preprocess, 24, 6, cfg.seed)  # the fixture's export
    features = embed(model, data.calibration)
    suffix = SUFFIXES[fmt]
    converted = (result.path / f"model_int8.{suffix}").read_bytes()
    entry = next(a for a in result.manifest.artefacts if a["file"] == f"model_int8.{suffix}")
    choice = entry.get("int8_candidate")
    assert (choice is not None) == (fmt == "executorch")
    head = model.model.get_classifier()
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()

    w_q, w_scale, b_q, b_scale, y_scale = int8_classifier(fmt, converted)
    w_again, w_scale_again, b_again, b_scale_again, y_scale_again = int8_classifier(
        fmt, fmt_driver.with_new_head(converted, weight, bias, features, choice))
    np.testing.assert_array_equal(w_again, w_q)
    np.testing.assert_allclose(w_scale_again, w_scale, rtol=1e-6)
    np.testing.assert_allclose(b_scale_again, b_scale, rtol=1e-6)
    np.testing.assert_allclose(b_again, b_q, atol=1)
    np.testing.assert_allclose(y_scale_again, y_scale, rtol=0.2)

    # a new class: a row between two known ones
    new_weight = np.concatenate([weight, (weight[:1] + weight[1:2]) / 2])
    new_bias = np.concatenate([bias, bias[:1]])
    install_head(model, torch.from_numpy(new_weight), torch.from_numpy(new_bias))
    with torch.no_grad():
        reference = model(torch.from_numpy(data.val_images)).numpy()
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / f"head.{suffix}"
        path.write_bytes(fmt_driver.with_new_head(converted, new_weight, new_bias, features, choice))
        runner = fmt_driver.Runner(path)
        assert runner.io["outputs"][0]["shape"] == [1, len(new_bias)]
        logits = runner(data.val_images)
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.75
    assert np.abs(logits - reference).max() < 0.25 * np.ptp(reference)
    no_fit = new_weight[:, 1:], new_bias, features[:, 1:], choice
    assert fmt_driver.with_new_head(converted, *no_fit) is None
    assert fmt_driver.with_new_head((result.path / f"model_fp32.{suffix}").read_bytes(), new_weight, new_bias,
                                    features, choice) is None  # an fp32 file with calibration features: not INT8
    if fmt == "executorch":  # the quantization depends on the export's choice: none, nothing written
        assert fmt_driver.with_new_head(converted, new_weight, new_bias, features) is None
        with pytest.raises(ValueError, match="int8_candidate"):  # nor one that names no candidate
            fmt_driver.with_new_head(converted, new_weight, new_bias, features,
                                     {"bias_corrected": True, "range_rule": "minmax"})
    if fmt == "tflite":  # an all-zero row gets no int8 weight scale from ai-edge-quantizer: converted instead
        new_weight[-1] = 0
        assert fmt_driver.with_new_head(converted, new_weight, new_bias, features) is None


def test_head_change_hands_the_source_int8_choice_to_the_driver() -> None:
    """The ExecuTorch INT8 candidate chosen for a backbone is passed back when only the head changed
    (the driver test above shows it then quantizes that candidate alone)."""
    from types import SimpleNamespace

    from pipeline.export import ArtefactSpec

    choices = []
    fake_driver = SimpleNamespace(export_chosen=lambda model, precision, calibration, choice:
                                  choices.append(choice) or (b"pte", {"int8_candidate": choice}))
    spec = ArtefactSpec("executorch", "int8", "model_int8.pte")
    kept = {"bias_corrected": True, "range_rule": "percentile"}
    source = {"model_int8.pte": (Path("source/model_int8.pte"), {"int8_candidate": kept})}
    assert bundle_mod._export(fake_driver, None, spec, np.zeros(1), source) == (b"pte", {"int8_candidate": kept})
    assert bundle_mod._export(fake_driver, None, spec, np.zeros(1), {}) == (b"pte", {"int8_candidate": None})
    assert choices == [kept, None]


def test_gate_rules() -> None:
    t = Thresholds(fp32_min_agreement=0.995, int8_max_top1_drop=0.015)
    assert gate({"agreement": 1.0, "top1": 0.9}, 0.9, "fp32", t) is None
    assert "below the 99.50% required" in gate({"agreement": 0.99, "top1": 0.9}, 0.9, "fp32", t)
    assert gate({"agreement": 0.9, "top1": 0.89}, 0.9, "int8", t) is None
    assert "2.00 pp below" in gate({"agreement": 0.9, "top1": 0.88}, 0.9, "int8", t)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    result = parity(probs, np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]), np.array([0, 1, 1]), ["a", "b"])
    assert result["agreement"] == pytest.approx(2 / 3) and result["top1"] == pytest.approx(2 / 3)
    assert result["max_prob_diff"] == pytest.approx(0.2)


def damage_onnx(payload: bytes) -> bytes:
    """Shuffle every weight tensor: the model still loads and runs, but answers differently."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(payload)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if len(tensor.dims) >= 2:
            weights = numpy_helper.to_array(tensor)
            scrambled = rng.permutation(weights.ravel()).reshape(weights.shape)
            tensor.CopyFrom(numpy_helper.from_array(scrambled, tensor.name))
    return model.SerializeToString()


def test_gate_leaves_out_a_damaged_artefact_and_exits_nonzero(exported, run_cache, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_driver = driver("onnx")
    real_export = onnx_driver.export

    def damaged_fp32(model, precision, calibration):
        payload = real_export(model, precision, calibration)
        return damage_onnx(payload) if precision == "fp32" else payload

    monkeypatch.setattr(onnx_driver, "export", damaged_fp32)
    result = CliRunner().invoke(main, ["export", str(exported["run"].run_dir), "--formats", "onnx",
                                       "--out", str(tmp_path / "dist"), "--calibration", "24",
                                       "--golden", "3", "--quiet"])
    assert result.exit_code == 1
    assert "parity gate failed" in result.output and "model_fp32.onnx" in result.output
    assert "Traceback" not in result.output
    bundle = tmp_path / "dist" / "data-resnet10t-v1"
    manifest = verify(bundle)
    assert [a["file"] for a in manifest["artefacts"]] == ["model_int8.onnx"]
    assert not (bundle / "model_fp32.onnx").exists()


def test_tampered_artefact_is_detected(exported, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["result"].path, bundle)
    verify(bundle)
    path = bundle / "model_int8.tflite"
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(BundleInvalid, match="model_int8.tflite: sha256 differs"):
        verify(bundle)
    (bundle / "model_fp32.pte").unlink()
    with pytest.raises(BundleInvalid, match="model_fp32.pte: missing"):
        verify(bundle)


def test_interrupted_export_leaves_no_bundle(exported, run_cache, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(model, precision, calibration):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver("onnx"), "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bundle_mod.export_run(exported["run"].run_dir, calibration_count=8, golden_count=3,
                              out_dir=tmp_path / "dist", artefacts=select("executorch-fp32,onnx"),
                              progress=False)
    assert list((tmp_path / "dist").iterdir()) == []


def test_terminated_export_command_leaves_no_bundle(exported, run_cache, tmp_path: Path) -> None:
    """``kill`` (SIGTERM) during ``trashsort export`` removes its staging folder, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "dist"
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "export",
               str(exported["run"].run_dir), "--out", str(out), "--calibration", "8", "--golden", "3", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out.is_dir() and any(out.iterdir())) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the export ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_existing_bundle_is_kept_unless_forced(exported, run_cache, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    options = dict(calibration_count=8, golden_count=3, out_dir=out, artefacts=select("onnx-fp32"),
                   progress=False)
    first = bundle_mod.export_run(exported["run"].run_dir, **options)
    with pytest.raises(bundle_mod.BundleError, match="already exists.*--force"):
        bundle_mod.export_run(exported["run"].run_dir, **options)
    again = bundle_mod.export_run(exported["run"].run_dir, force=True, **options)
    assert again.path == first.path and verify(again.path)
    assert [p.name for p in out.iterdir()] == [first.path.name]


def test_head_is_written_only_into_a_bundle_of_the_same_backbone(exported, run_cache, tmp_path: Path) -> None:
    source = exported["result"].path
    options = dict(calibration_count=8, golden_count=3, artefacts=select("tflite-fp32"), progress=False)
    same = bundle_mod.export_run(exported["run"].run_dir, out_dir=tmp_path / "a", head_source=source, **options)
    written = same.manifest.artefacts[0]
    assert written["head_update"]["from_sha256"] == sha256_file(source / "model_fp32.tflite")
    assert written["val"]["agreement"] == 1.0

    other = tmp_path / "other"  # the same files, but the manifest says another backbone
    shutil.copytree(source, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["backbone_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    converted = bundle_mod.export_run(exported["run"].run_dir, out_dir=tmp_path / "b", head_source=other,
                                      **options)
    assert "head_update" not in converted.manifest.artefacts[0]


def test_a_head_written_artefact_failing_the_gate_is_converted_anew(exported, run_cache, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The fast path may not cost an artefact: a head change whose written-in file fails the gate
    converts that artefact as a full export would, and gates it again."""
    source = exported["result"].path
    write_head = tflite_driver.with_new_head

    def rows_swapped(payload: bytes, weight: np.ndarray, bias: np.ndarray, features=None,
                     choice=None) -> bytes | None:
        return write_head(payload, weight[::-1], bias[::-1], features, choice)  # a head written in wrongly

    monkeypatch.setattr(tflite_driver, "with_new_head", rows_swapped)
    result = bundle_mod.export_run(exported["run"].run_dir, out_dir=tmp_path, head_source=source,
                                   calibration_count=8, golden_count=3, artefacts=select("tflite"), progress=True)
    assert result.failures == {}
    entries = {a["file"]: a for a in result.manifest.artefacts}
    assert sorted(entries) == ["model_fp32.tflite", "model_int8.tflite"]
    assert not any("head_update" in entry for entry in entries.values())  # both converted
    assert entries["model_fp32.tflite"]["val"]["agreement"] == 1.0
    assert capsys.readouterr().out.count("with the new head written in: ") == 2


def test_select_artefacts() -> None:
    assert [a.file for a in select("tflite")] == ["model_fp32.tflite", "model_int8.tflite"]
    assert [a.file for a in select("onnx-int8,executorch-fp32")] == ["model_fp32.pte", "model_int8.onnx"]
    with pytest.raises(ValueError, match="unknown artefact"):
        select("coreml")


def test_executorch_int8_observes_relu6_after_the_clamp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conv whose output spans far more than [0, 6] before ReLU6 keeps a fine INT8 step after it."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    from pipeline.export import executorch as et_driver

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=5.0)
    model = torch.nn.Sequential(conv, torch.nn.ReLU6()).eval()
    calibration = torch.rand(16, 3, 16, 16) * 2 - 1
    exported = torch.export.export(model, (calibration[:1],))

    def int8_error() -> float:
        quantized = et_driver._quantize(exported, calibration.numpy())
        with torch.no_grad():
            int8_out = torch.cat([quantized(x[None]) for x in calibration])
            return float((int8_out - model(calibration)).abs().mean())

    with torch.no_grad():
        assert float(conv(calibration).abs().max()) > 30  # a step of > 0.2 over the pre-clamp range
    quantized = et_driver._quantize(exported, calibration.numpy())
    scales = [n.args[1] for n in quantized.graph.nodes
              if "quantize_per_tensor" in str(n.target) and n.args[0].name.startswith("hardtanh")]
    assert scales and max(scales) <= 6.0 / 255 * 1.01, scales
    ours = int8_error()
    monkeypatch.setattr(et_driver, "ActivationAwareQuantizer", XNNPACKQuantizer)
    assert ours < 0.5 * int8_error()


def test_clip_to_a_saturating_activations_interval() -> None:
    from pipeline.export.ranges import HARDSIGMOID_INPUT, HARDSWISH_INPUT, clip_to

    low, high = clip_to(np.array([-40.0, -1.0]), np.array([20.0, 50.0]), HARDSWISH_INPUT)
    np.testing.assert_allclose(low, [-3.0, -1.0])
    np.testing.assert_allclose(high, [20.0, 50.0])
    low, high = clip_to(np.array(-40.0), np.array(20.0), HARDSIGMOID_INPUT)
    assert (float(low), float(high)) == (-3.0, 3.0)
    # A tensor that never leaves the constant part keeps its range (nothing to resolve).
    low, high = clip_to(np.array(-40.0), np.array(-5.0), HARDSWISH_INPUT)
    assert (float(low), float(high)) == (-40.0, -5.0)


def hardswish_model():
    """A conv whose output spans about [-40, 40] before a hardswish (as MobileNetV3's do: most of
    the negative part becomes 0), then a squeeze-excite style hardsigmoid gate; with photos."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.gate = torch.nn.Conv2d(8, 8, 1)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the contract: uint8 NHWC in
            x = torch.nn.functional.hardswish(self.conv(x.permute(0, 3, 1, 2).float() / 255 - 0.5))
            gate = torch.nn.functional.hardsigmoid(self.gate(x.mean(dim=(2, 3), keepdim=True)))
            return self.fc((x * gate).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.conv.weight.normal_(std=8.0)
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        assert float(model.conv(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5).min()) < -20
    return model, images


def hardswish_input_lowest(fmt: str, model, images: np.ndarray) -> float:
    """The lowest value the INT8 artefact can represent at the hardswish's input (int8 level -128)."""
    if fmt == "executorch":
        import torch

        exported = torch.export.export(model, (torch.from_numpy(images[:1]),))
        graph = driver("executorch")._quantize(exported, images).graph
        node = next(n for n in graph.nodes if n.target == torch.ops.aten.hardswish.default)
        scale, zero_point = node.args[0].args[1:3]  # its dequantize's (scale, zero point)
    elif fmt == "tflite":
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_driver.export(model, "int8", images)))
        graph = tflite.subgraphs[0]
        op = next(o for o in graph.operators if tflite.operatorCodes[o.opcodeIndex].builtinCode
                  == schema.BuiltinOperator.HARD_SWISH)
        quantization = graph.tensors[op.inputs[0]].quantization
        scale, zero_point = quantization.scale[0], quantization.zeroPoint[0]
    else:  # onnxruntime writes hardswish as x * HardSigmoid(x): the first HardSigmoid reads x
        import onnx
        from onnx import numpy_helper

        graph = onnx.load_from_string(driver("onnx").export(model, "int8", images)).graph
        values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        produced_by = {n.output[0]: n for n in graph.node}
        dequantize = produced_by[next(n for n in graph.node if n.op_type == "HardSigmoid").input[0]]
        scale, zero_point = values[dequantize.input[1]], values[dequantize.input[2]]
    return float((-128 - int(zero_point)) * float(scale))


@pytest.mark.parametrize("fmt", ["executorch", "tflite", "onnx"])
def test_int8_spends_no_levels_where_hardswish_is_constant(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each INT8 driver quantizes a hardswish's input over [-3, max] only (below -3 it outputs 0),
    not over the conv's whole range."""
    model, images = hardswish_model()
    assert -3.2 < hardswish_input_lowest(fmt, model, images) < -2.5
    if fmt == "executorch":
        monkeypatch.setattr(driver("executorch"), "SATURATING", {})
    elif fmt == "tflite":
        monkeypatch.setattr(tflite_driver, "_hardswish_inputs", lambda _model: set())
    else:
        monkeypatch.setattr(driver("onnx"), "_saturated_inputs", lambda _graph: {})
    assert hardswish_input_lowest(fmt, model, images) < -15


def test_onnx_finds_hardswish_and_hardsigmoid_inputs(tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, images = hardswish_model()
    float_path, prepared = tmp_path / "float.onnx", tmp_path / "prepared.onnx"
    float_path.write_bytes(driver("onnx").export(model, "fp32", images))
    quant_pre_process(str(float_path), str(prepared))
    intervals = driver("onnx")._saturated_inputs(onnx.load(str(prepared)).graph)
    found = sorted((round(low, 4), round(high, 4)) for low, high in intervals.values())
    assert found == [(-3.0, 3.0), (-3.0, float("inf"))]  # the gate, and the hardswish (x * gate(x))


def xnnpack_graphs(program) -> list[dict]:
    """The XNNPACK graph (nodes, values) inside each delegate of a lowered ExecuTorch program, read
    with the flatc and schema that ship in the executorch package."""
    import subprocess

    import executorch
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader

    package = Path(next(iter(executorch.__path__)))
    graphs = []
    for name, module in program.exported_program().graph_module.named_children():
        if not name.startswith("lowered_module"):
            continue
        payload = module.processed_bytes
        header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
        with TemporaryDirectory() as tmp:
            binary = Path(tmp) / "graph.bin"
            binary.write_bytes(payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
            subprocess.run([package / "data/bin/flatc", "--json", "--strict-json", "--raw-binary", "-o", tmp,
                            package / "backends/xnnpack/serialization/schema.fbs", "--", binary], check=True)
            text = (Path(tmp) / "graph.json").read_text()
        graphs.append(json.loads(text.replace(": inf", ": 1e999").replace(": -inf", ": -1e999")))
    return graphs


def float_islands(graph: dict) -> list[str]:
    """Ops that XNNPACK runs in float on values computed inside the graph (not the graph's float
    input, not constants): in an INT8 graph, each sits between int8 -> float -> int8 conversions."""
    computed_float = set()
    for value in graph["xvalues"]:
        union = value["xvalue_union"]
        tensor = union.get("tensor_value", union)  # flatc leaves out fields that are 0
        if (tensor["datatype"] == "xnn_datatype_fp32" and "constant_buffer_idx" not in tensor
                and tensor.get("external_id", 0xFFFFFFFF) == 0xFFFFFFFF):
            computed_float.add(tensor.get("id_out", 0))
    return [node["xnode_union_type"] for node in graph["xnodes"] if node["xnode_union_type"] != "XNNConvert"
            and any(node["xnode_union"].get(k) in computed_float for k in ("input_id", "input1_id", "input2_id"))]


def test_executorch_int8_runs_pad_and_hardswish_in_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """A "SAME"-padded stride-2 conv (the tf_ models' explicit zero pad) and a hardswish stay in
    int8 inside XNNPACK, with no int8 -> float -> int8 round trip around them, and the .pte in its
    runtime computes what the quantized PyTorch graph does; out of the box both ran in float."""
    import torch
    import torch.nn.functional as F

    from pipeline.export import executorch as et_driver

    class Same(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, stride=2, groups=8)
            self.fc = torch.nn.Linear(8, 3)
            self.register_buffer("scale", torch.full((1, 3, 1, 1), 1 / 127.5))
            self.register_buffer("shift", torch.full((1, 3, 1, 1), -1.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the contract: uint8 NHWC in
            x = x.float().permute(0, 3, 1, 2) * self.scale + self.shift  # as ContractModel
            x = F.hardswish(self.conv(F.pad(x, (0, 1, 0, 1))))
            x = F.hardtanh(self.depthwise(F.pad(x, (0, 1, 0, 1))), 0.0, 6.0)  # nn.ReLU6
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Same().eval()
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    exported = torch.export.export(model, (torch.from_numpy(images[:1]),))
    quantized = et_driver._quantize(exported, images)

    def lowered(quantized_model):
        return et_driver.lower(torch.export.export(quantized_model, (torch.from_numpy(images[:1]),)))

    program = lowered(quantized)
    graphs = xnnpack_graphs(program)
    kinds = [n["xnode_union_type"] for g in graphs for n in g["xnodes"]]
    assert kinds.count("XNNStaticConstantPad") == 2 and "XNNHardswish" in kinds
    assert [island for g in graphs for island in float_islands(g)] == []

    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pte"
        path.write_bytes(program.to_executorch().buffer)
        got = driver("executorch").Runner(path)(images)
    with torch.no_grad():
        want = torch.cat([quantized(torch.from_numpy(images[i:i + 1])) for i in range(len(images))]).numpy()
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() < 0.05 * scale

    # What the partitioner and quantizer did out of the box: pad and hardswish in float.
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS

    monkeypatch.setattr(et_driver, "_share_input_quantization", lambda *args: None)
    monkeypatch.setattr(et_driver, "_quantize_in_and_out", lambda *args: None)
    monkeypatch.setattr(et_driver, "PARTITIONER_CONFIGS", ALL_PARTITIONER_CONFIGS)
    islands = [island for g in xnnpack_graphs(lowered(et_driver._quantize(exported, images)))
               for island in float_islands(g)]
    assert islands.count("XNNStaticConstantPad") == 2 and "XNNHardswish" in islands


def test_executorch_int8_leaves_pad_and_hardswish_after_a_float_op_in_float() -> None:
    """Where the producer is not quantized (here a scalar divide and subtract), hardswish and pad
    stay in float instead of sharing a quantization that does not exist; the export still runs."""
    import torch
    import torch.nn.functional as F

    from pipeline.export import executorch as et_driver

    class FloatFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.hardswish(x.float().permute(0, 3, 1, 2) / 64 - 2)
            return self.conv(F.pad(x, (0, 1, 0, 1))).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = FloatFirst().eval()
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pte"
        path.write_bytes(et_driver.export(model, "int8", images))
        got = driver("executorch").Runner(path)(images)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_executorch_range_observer_takes_the_shared_percentile_rule() -> None:
    """The ExecuTorch percentile rule ranges a tensor as the LiteRT and ONNX drivers do
    (``ranges.py``: percentile of per-photo extremes, then clipped to a saturating interval), from
    the same calibration pass as the histogram rule, which it leaves as PT2E computes it."""
    import torch
    from torchao.quantization.pt2e.observer import HistogramObserver

    from pipeline.export import executorch as et_driver
    from pipeline.export.ranges import HARDSWISH_INPUT, clip_to, percentile_range

    photos = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    photos[7] = photos[7] * 40  # one outlier photo
    plain, within = et_driver.RangeObserver(), et_driver.RangeObserver(*HARDSWISH_INPUT)
    histogram = HistogramObserver()
    for photo in photos:
        assert plain(photo) is photo and within(photo) is photo
        histogram(photo)
    assert plain.calculate_qparams() == histogram.calculate_qparams()  # the default rule

    def ranged(observer: et_driver.RangeObserver, low: float, high: float) -> tuple:
        return observer._calculate_qparams(torch.tensor(low), torch.tensor(high))

    plain.rule = within.rule = "percentile"
    mins, maxs = [p.min().numpy() for p in photos], [p.max().numpy() for p in photos]
    low, high = percentile_range(mins, maxs)
    assert plain.calculate_qparams() == ranged(plain, float(low), float(high))
    assert float(high) < 0.5 * float(photos[7].max())  # the outlier photo does not set it
    clipped = clip_to(low, high, HARDSWISH_INPUT)
    assert float(clipped[0]) > float(low)  # the interval clips this range
    assert within.calculate_qparams() == ranged(within, float(clipped[0]), float(clipped[1]))


def test_executorch_int8_keeps_the_candidate_closer_to_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four candidates, the model as it is and bias-corrected, each calibrated once and converted
    with both activation range rules; the export keeps the one whose logits on the calibration
    photos are closer to the float model's (mean KL), and each candidate equals that model and rule
    quantized on its own (the percentile rule's calibration then keeps no histogram)."""
    import torch

    from pipeline.export import executorch as et_driver
    from pipeline.export.bias_correction import bias_corrected

    model, images = hardswish_model()
    calibrations, candidates, kls = [], [], []

    def recorded(results: list, function: Callable) -> Callable:
        return lambda *args, **kwargs: results.append(function(*args, **kwargs)) or results[-1]

    monkeypatch.setattr(et_driver, "_calibrated", recorded(calibrations, et_driver._calibrated))
    monkeypatch.setattr(et_driver, "_converted", recorded(candidates, et_driver._converted))
    monkeypatch.setattr(et_driver, "mean_kl", recorded(kls, et_driver.mean_kl))
    chosen, choice = et_driver._closest_int8(model, images)
    assert len(calibrations) == 2 and len(candidates) == 2 * len(et_driver.RANGE_RULES) == len(kls) == 4
    best = int(np.argmin(kls))
    assert chosen is candidates[best]
    assert choice == {"bias_corrected": best >= 2, "range_rule": et_driver.RANGE_RULES[best % 2]}  # the manifest's
    assert len(set(kls)) == 4  # four different quantizations here
    # a head change passes that choice back: one calibration, one conversion, the same model
    again, same_choice = et_driver._closest_int8(model, images, choice)
    assert len(calibrations) == 3 and len(candidates) == 5 and len(kls) == 4 and same_choice == choice
    observers = [m for m in calibrations[-1].modules() if isinstance(m, et_driver.RangeObserver)]
    assert observers and all(m.keep_histogram == (choice["range_rule"] == "histogram") for m in observers)
    candidates.pop()
    np.testing.assert_array_equal(et_driver._logits(again, images), et_driver._logits(chosen, images))
    for bad in ({"range_rule": "histogram"}, {"bias_corrected": False, "range_rule": "minmax"}):
        with pytest.raises(ValueError, match="int8_candidate"):
            et_driver._closest_int8(model, images, bad)
    monkeypatch.undo()
    variants = [model, bias_corrected(model, images)]
    for index, candidate in enumerate(candidates):
        variant, rule = variants[index // 2], et_driver.RANGE_RULES[index % 2]
        alone = et_driver._quantize(torch.export.export(variant, (torch.from_numpy(images[:1]),)), images, rule)
        np.testing.assert_array_equal(et_driver._logits(candidate, images), et_driver._logits(alone, images))
