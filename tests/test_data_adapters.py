"""torch Datasets and DataLoaders as ``data=``: the same rows, labels and concepts as the tensors
they hold, read by index (never shuffled), resumable, and one-line errors for what cannot work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

import pyengine
from pyengine import cli, host
from pyengine.data import Shapes, TensorDataset, as_dataset
from pyengine.errors import PyengineError, StoreError
from pyengine.models import DemoCNN

LAYERS = ["features.relu1", "classifier.relu4"]


@pytest.fixture(scope="module")
def rows() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """24 shapes images at 16x16: inputs, labels and the texture concept."""
    batch = Shapes(24, seed=3, size=16).batch(range(24))
    return batch.inputs, batch.labels, {"texture": batch.concepts["texture"]}


@pytest.fixture
def model() -> DemoCNN:
    torch.manual_seed(0)
    return DemoCNN(width=4, image_size=16).eval()


class ImageLabelDataset(Dataset[Any]):
    """torchvision style: ``(transform(image), target)``, class names in ``classes``."""

    classes = ["square", "circle", "triangle", "cross"]

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], Any] = lambda x: x):
        self.images, self.targets, self.transform = images, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), self.targets[index]


class HFStyleDataset(Dataset[Any]):
    """Hugging Face style rows: ``{"pixel_values": numpy array, "label": int, ...}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.numpy(), labels.numpy()
        self.features = {"pixel_values": None, "label": ClassLabel()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.images[index], "label": self.labels[index], "id": f"img{index}"}


class ClassLabel:
    """What ``datasets.ClassLabel`` offers: the class ``names``."""

    names = ["square", "circle", "triangle", "cross"]


class ConceptDataset(Dataset[Any]):
    """``(image, label, {concept: code})`` rows."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, concepts: dict[str, torch.Tensor]) -> None:
        self.images, self.labels, self.concepts = images, labels, concepts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        return self.images[index], self.labels[index], {k: int(v[index]) for k, v in self.concepts.items()}


class Items(Dataset[Any]):
    """Rows given as a list of items."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def saliency(model: DemoCNN, data: Any = None, inputs: torch.Tensor | None = None, **options: Any) -> pyengine.Result:
    return pyengine.run("saliency", model, inputs, data=data, progress=False, batch_size=5, **options)


def test_saliency_over_datasets_and_loaders_equals_the_tensors(rows, model) -> None:
    x, labels, _ = rows
    expected = saliency(model, inputs=x, target=labels.tolist()).attributions
    sources = {
        "tuples": ImageLabelDataset(x, labels),
        "hf dicts": HFStyleDataset(x, labels),
        "shuffled loader": DataLoader(ImageLabelDataset(x, labels), batch_size=7, shuffle=True),
        "loader with a collate_fn": DataLoader(
            HFStyleDataset(x, labels),
            batch_size=3,
            collate_fn=lambda items: {
                "pixel_values": torch.stack([torch.from_numpy(item["pixel_values"]) for item in items]),
                "labels": torch.tensor([int(item["label"]) for item in items]),
            },
        ),
    }
    for name, source in sources.items():
        result = saliency(model, data=source, target="label")
        assert torch.equal(result.attributions, expected), name
        assert result.rows.startswith("24 rows 0-23 of dataset"), result.rows


def test_capture_from_a_loader_equals_capture_from_tensors(rows, model, tmp_path: Path) -> None:
    x, labels, concepts = rows
    reference = pyengine.capture(
        model,
        TensorDataset(x, labels, concepts),
        LAYERS,
        tmp_path / "tensors.h5",
        batch_size=7,
        dtype="float32",
        progress=False,
    )
    loader = DataLoader(ConceptDataset(x, labels, concepts), batch_size=7, shuffle=True)
    steps: list[int] = []
    path = pyengine.capture(
        model, loader, LAYERS, tmp_path / "loader.h5", dtype="float32", progress=False, on_batch=steps.append
    )
    assert steps == [7, 14, 21, 24]  # the loader's batch size, rows in dataset order
    with h5py.File(reference, "r") as want, h5py.File(path, "r") as got:
        for name in [
            "inputs/index",
            "inputs/labels",
            "concepts/texture",
            *(f"activations/{layer}" for layer in LAYERS),
        ]:
            np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)
        assert got["meta"].attrs["dataset_name"] == "ConceptDataset"


def test_capture_over_a_torch_dataset_resumes(rows, model, tmp_path: Path) -> None:
    x, labels, concepts = rows
    straight = pyengine.capture(
        model, ConceptDataset(x, labels, concepts), LAYERS, tmp_path / "a.h5", batch_size=5, progress=False
    )

    def stop_after_two(done: int) -> None:
        if done == 10:
            raise KeyboardInterrupt

    target = tmp_path / "b.h5"
    with pytest.raises(KeyboardInterrupt):
        pyengine.capture(
            model,
            ConceptDataset(x, labels, concepts),
            LAYERS,
            target,
            batch_size=5,
            progress=False,
            on_batch=stop_after_two,
        )
    changed = x.clone()
    changed[-1, 0, 0, 0] += 0.5  # the last row is among the hashed ones
    with pytest.raises(StoreError, match="interrupted capture with a different configuration"):
        pyengine.capture(model, ConceptDataset(changed, labels, concepts), LAYERS, target, batch_size=5, progress=False)
    steps: list[int] = []
    resumed = pyengine.capture(
        model, ConceptDataset(x, labels, concepts), LAYERS, target, batch_size=5, progress=False, on_batch=steps.append
    )
    assert steps == [15, 20, 24]
    with h5py.File(straight, "r") as want, h5py.File(resumed, "r") as got:
        for layer in LAYERS:
            np.testing.assert_array_equal(got[f"activations/{layer}"][:], want[f"activations/{layer}"][:])
        np.testing.assert_array_equal(got["concepts/texture"][:], concepts["texture"].numpy())


def test_describe_hashes_sampled_rows(rows) -> None:
    x, labels, _ = rows
    first = as_dataset(ImageLabelDataset(x, labels)).describe()
    assert first == as_dataset(DataLoader(ImageLabelDataset(x.clone(), labels), batch_size=4, shuffle=True)).describe()
    assert first["name"] == "ImageLabelDataset" and first["size"] == 24 and first["sampled_rows"] == 24
    for row in (0, 11, 23):  # 24 <= 32 rows: every row is hashed
        changed = x.clone()
        changed[row].view(-1)[5] = torch.nextafter(changed[row].view(-1)[5], torch.tensor(2.0))
        assert as_dataset(ImageLabelDataset(changed, labels)).describe()["sha256"] != first["sha256"], row
    relabelled = labels.clone()
    relabelled[3] = (relabelled[3] + 1) % 4
    assert as_dataset(ImageLabelDataset(x, relabelled)).describe()["sha256"] != first["sha256"]
    big = Items([(torch.full((2,), float(i)), i % 3) for i in range(1000)])
    described = as_dataset(big).describe()
    assert described["sampled_rows"] == 32 and described["size"] == 1000
    big.items[999] = (torch.full((2,), -1.0), 0)  # the last row is always sampled
    assert as_dataset(big).describe()["sha256"] != described["sha256"]


def test_labels_classes_and_concepts(rows) -> None:
    x, labels, concepts = rows
    data = as_dataset(ConceptDataset(x, labels, concepts))
    batch = data.batch([3, 1, 20])
    assert torch.equal(batch.inputs, x[[3, 1, 20]]) and torch.equal(batch.labels, labels[[3, 1, 20]])
    assert torch.equal(batch.concepts["texture"], concepts["texture"][[3, 1, 20]])
    assert data.concept_names == {"texture": ()}
    assert as_dataset(ImageLabelDataset(x, labels)).class_names == ("square", "circle", "triangle", "cross")
    assert as_dataset(HFStyleDataset(x, labels)).class_names == ("square", "circle", "triangle", "cross")
    assert as_dataset(Items([x[0]])).class_names == ()
    unlabelled = as_dataset(Items([x[i] for i in range(4)]))
    assert unlabelled.batch(range(4)).labels.tolist() == [-1, -1, -1, -1]
    with pytest.raises(PyengineError, match="target='label' needs labelled dataset rows"):
        saliency(DemoCNN(width=4, image_size=16), data=Items([x[i] for i in range(4)]), target="label")


def test_pil_images_ask_for_a_to_tensor_transform(rows, tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    x, labels, _ = rows
    for i in range(3):
        pixels = (x[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        image_module.fromarray(pixels).save(tmp_path / f"{i}.png")

    def load(i: torch.Tensor) -> Any:
        return image_module.open(tmp_path / f"{int(i)}.png").convert("RGB")

    def to_tensor(image: Any) -> torch.Tensor:  # what torchvision's ToTensor does
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255

    indices = torch.arange(3)
    with pytest.raises(PyengineError, match=r"row 0: the input is a PIL image; .*add a ToTensor transform") as error:
        as_dataset(ImageLabelDataset(indices, labels[:3], transform=load))
    assert "\n" not in str(error.value)
    data = as_dataset(ImageLabelDataset(indices, labels[:3], transform=lambda i: to_tensor(load(i))))
    np.testing.assert_allclose(data.batch(range(3)).inputs.numpy(), x[:3].numpy(), atol=0.5 / 255 + 1e-7)


class Stream(IterableDataset[Any]):
    def __iter__(self) -> Any:
        yield torch.zeros(3)


def ragged(rows: Any) -> Items:
    x, labels, _ = rows
    return Items([(x[i] if i != 5 else x[i][:, :15, :], int(labels[i])) for i in range(8)])


class RandomCrop(Items):
    def __getitem__(self, index: int) -> Any:
        return torch.randn(3, 16, 16), 0


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda r: Stream(), "cannot use the IterableDataset Stream as data: pyengine reads rows by index"),
        (lambda r: DataLoader(Stream(), batch_size=2), "IterableDataset Stream"),
        (lambda r: DataLoader(Items([torch.zeros(3)] * 4), batch_size=None), "a DataLoader with batch_size=None"),
        (lambda r: Items([]), "Items has 0 rows; expected at least one"),
        (
            lambda r: Items([{"image_path": "a.png", "label": 1}]),
            "expected the input under one of input_ids, pixel_values, image",
        ),
        (lambda r: Items([(torch.zeros(3), 0.5)]), "row 0: the label is 0.5; expected an integer class index"),
        (lambda r: Items([(torch.zeros(3), torch.tensor([0, 1, 0]))]), "the label is a tensor of shape (3,)"),
        (lambda r: Items([(torch.zeros(3), 1, {"red": 1}, "extra")]), "a tuple of 4 values; expected (x,), (x, label)"),
        (lambda r: Items([(torch.zeros(3), 1, {"red": -2})]), "concept 'red' is -2; expected an integer >= 0"),
        (lambda r: Items(["a text"]), "row 0: the input is a str; expected a tensor, a numpy array"),
        (lambda r: RandomCrop([0, 0]), "row 0 differs between two reads (a random transform?)"),
        (lambda r: {"inputs": torch.zeros(3, 2)}, "cannot use dict as a dataset"),
    ],
)
def test_unusable_data_is_one_clear_error(rows, make, fragment: str) -> None:
    with pytest.raises(PyengineError) as error:
        as_dataset(make(rows))
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_rows_of_another_shape_or_other_concepts_name_the_row(rows, model, tmp_path: Path) -> None:
    with pytest.raises(PyengineError) as error:
        saliency(model, data=ragged(rows), target="label")
    message = str(error.value)
    assert message.startswith("Items: row 5 has inputs of shape (3, 15, 16) but row 0 has (3, 16, 16)"), message
    assert "\n" not in message
    with pytest.raises(PyengineError, match="row 5 has inputs of shape"):  # caught by describe() before any work
        pyengine.capture(model, ragged(rows), LAYERS, tmp_path / "a.h5", progress=False)
    assert not list(tmp_path.iterdir())
    x, _, _ = rows
    doubles = Items([(x[i].double() if i == 2 else x[i], 0) for i in range(4)])
    with pytest.raises(PyengineError, match="row 2 has inputs of dtype torch.float64 but row 0 has torch.float32"):
        as_dataset(doubles).batch(range(4))
    mixed = Items([(x[i], 0, {"red": 1} if i != 3 else {"blue": 0}) for i in range(6)])
    with pytest.raises(PyengineError, match=r"row 3 has concepts \['blue'\] but row 0 has \['red'\]"):
        as_dataset(mixed).batch(range(6))


def test_a_config_dataset_may_be_a_loader(rows, tmp_path: Path) -> None:
    """A registered dataset factory returning a shuffled DataLoader: `pyengine run` reads its rows in order."""
    x, labels, _ = rows

    class LoaderPlugin:
        @pyengine.hookimpl
        def register_datasets(self, register: Any) -> None:
            register("shapes-loader", lambda: DataLoader(ImageLabelDataset(x, labels), batch_size=5, shuffle=True))

    config = tmp_path / "run.toml"
    config.write_text(
        'out = "results.h5"\n[model]\nname = "demo-cnn"\nargs = { width = 4, image_size = 16 }\n'
        '[data]\nname = "shapes-loader"\ninputs = 0\n'
        '[[technique]]\nname = "saliency"\noptions = { target = "label", batch_size = 5 }\n'
    )
    host.load_plugins()
    host.pm.register(LoaderPlugin(), name="loader-plugin")
    try:
        assert cli.main(["-q", "run", str(config)]) == 0
    finally:
        host.pm.unregister(name="loader-plugin")
    model = host.build_seeded(DemoCNN, width=4, image_size=16)
    expected = saliency(model, inputs=x, target=labels.tolist()).attributions
    with h5py.File(tmp_path / "results.h5", "r") as f:
        (run,) = f["results/saliency"].values()
        np.testing.assert_array_equal(run["attributions"][:], expected.numpy())
