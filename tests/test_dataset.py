"""SampleDataset, collate and the loader: shapes, caption choice, bad samples, cache, determinism, resume, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from codebridge.config import ConfigError, PrepConfig, to_dict
from codebridge.data.dataset import SampleDataset, all_texts, build_loader, collate
from codebridge.data.modalities.audio import AudioPrep
from codebridge.data.modalities.image import ImagePrep
from codebridge.data.modalities.text import TextPrep
from codebridge.data.modalities.video import VideoPrep
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sample import BadSampleError, Sample

PREP = PrepConfig(
    sections={
        "image": ImagePrep(size=16),
        "text": TextPrep(context_length=12, vocab_size=300),
        "audio": AudioPrep(sample_rate=8000, n_mels=16, n_fft=200, hop_length=80, max_seconds=0.5),
        "video": VideoPrep(frames=3, size=16),
    }
)
COUNT = 12


def write_mp4(path: Path, count: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.options = {"threads": "1"}
        for k in range(count):
            frame = np.full((16, 16, 3), 30 * k, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_samples(root: Path) -> list[Sample]:
    """COUNT samples with every modality: distinct images, 3 captions each, audio of different lengths."""
    rng = np.random.default_rng(0)
    write_mp4(root / "a.mp4", 4)
    samples = []
    for i in range(COUNT):
        image = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(image)
        audio = root / f"{i}.wav"
        sf.write(audio, 0.1 * rng.standard_normal(1000 + 500 * i), 16000)  # 0.06 s .. 0.4 s
        labels = {"concept": i} if i % 2 else {"concept": i, "group": i // 4}
        texts = [f"caption {w} of {i}" for w in ("one", "two", "three")]
        samples.append(
            Sample(
                key=str(i),
                source=f"data.csv:{i + 2}",
                labels=labels,
                media={"image": str(image), "text": texts, "audio": str(audio), "video": str(root / "a.mp4")},
            )
        )
    return samples


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    return make_samples(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def prep(samples: list[Sample]) -> Preprocessors:
    return Preprocessors(PREP, Tokenizer.train(all_texts(samples), PREP.text))


def dataset(samples: list[Sample], prep: Preprocessors, modalities=("image", "text"), **kwargs) -> SampleDataset:
    return SampleDataset(samples, list(modalities), prep, **{"train": True, **kwargs})


def test_preprocessors_save_and_load(prep: Preprocessors, tmp_path: Path) -> None:
    prep.save(tmp_path)
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == prep.to_dict() == to_dict(PREP)
    loaded = Preprocessors.load(tmp_path)
    assert loaded.prep == PREP and loaded["video"].image.prep.size == PREP.video.size
    assert torch.equal(loaded.tokenizer.encode(["caption two of 7"])[0], prep.tokenizer.encode(["caption two of 7"])[0])
    with pytest.raises(ConfigError, match="differs from the tokenizer"):
        Preprocessors(PrepConfig(sections={"text": TextPrep(context_length=20)}), prep.tokenizer)
    (tmp_path / "preprocessing.json").write_text(json.dumps({"image": {"size": "big"}}))
    with pytest.raises(ConfigError, match=r"preprocessing\.json: image\.size: expected an integer"):
        Preprocessors.load(tmp_path)


def test_all_texts_lists_every_caption(samples: list[Sample]) -> None:
    texts = list(all_texts(samples))
    assert len(texts) == 3 * COUNT and texts[:2] == ["caption one of 0", "caption two of 0"]


def test_items_and_collate_follow_the_batch_contract(samples: list[Sample], prep: Preprocessors) -> None:
    ds = dataset(samples, prep, ("image", "text", "audio", "video"))
    items = [ds[i] for i in (1, 0, 5)]
    assert items[0]["index"] == 1 and items[0]["labels"] == {"concept": 1}
    batch = collate([items[0], None, items[1], items[2]])
    assert batch["index"].tolist() == [1, 0, 5]
    assert batch["labels"]["concept"].tolist() == [1, 0, 5] and batch["labels"]["group"].tolist() == [-1, 0, -1]
    assert batch["image"]["pixels"].shape == (3, 3, 16, 16)
    assert batch["text"]["ids"].shape == batch["text"]["mask"].shape == (3, 12)
    assert batch["video"]["frames"].shape == (3, 3, 3, 16, 16)
    frames = [1 + (500 + 250 * i) // 80 for i in (1, 0, 5)]  # 16 kHz files resampled to 8 kHz, hop 80
    mel, mask = batch["audio"]["mel"], batch["audio"]["mask"]
    assert mel.shape == (3, max(frames), 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == frames
    for row, n in enumerate(frames):
        assert torch.equal(mel[row, :n], items[row]["audio"]["mel"]) and (mel[row, n:] == 0).all()
    assert collate([None, None]) is None


def caption(prep: Preprocessors, item: dict) -> str:
    return prep.tokenizer.decode(item["text"]["ids"])


def test_caption_is_random_per_seed_epoch_index_at_train_and_the_first_at_eval(
    samples: list[Sample], prep: Preprocessors
) -> None:
    ds = dataset(samples, prep, ("text",), seed=3)
    chosen = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        chosen.append(caption(prep, ds[4]))
        assert caption(prep, ds[4]) == chosen[-1]  # same (seed, epoch, index): same caption
    assert set(chosen) == {f"caption {w} of 4" for w in ("one", "two", "three")}
    again = dataset(samples, prep, ("text",), seed=3)
    again.set_epoch(5)
    assert caption(prep, again[4]) == chosen[5]
    ev = dataset(samples, prep, ("text",), train=False)
    for epoch in range(3):
        ev.set_epoch(epoch)
        assert caption(prep, ev[4]) == "caption one of 4"


def test_augmentation_depends_on_epoch_and_not_on_other_modalities(samples: list[Sample], prep: Preprocessors) -> None:
    image_only = dataset(samples, prep, ("image",))
    both = dataset(samples, prep, ("text", "image"))
    assert torch.equal(image_only[2]["image"]["pixels"], both[2]["image"]["pixels"])
    image_only.set_epoch(1)
    assert not torch.equal(image_only[2]["image"]["pixels"], both[2]["image"]["pixels"])


def corrupt_copy(samples: list[Sample], root: Path, index: int) -> list[Sample]:
    broken = root / "broken.png"
    broken.write_bytes(b"this is not a png")
    copy = list(samples)
    copy[index] = Sample(key="bad", source=f"data.csv:{index + 2}", media={"image": str(broken), "text": ["a caption"]})
    return copy


def test_bad_samples_raise_naming_the_file_or_are_skipped_and_recorded(
    samples: list[Sample], prep: Preprocessors, tmp_path: Path
) -> None:
    bad = corrupt_copy(samples, tmp_path, 3)
    with pytest.raises(BadSampleError, match=r"data\.csv:5: image .*broken\.png: not an image format") as info:
        dataset(bad, prep)[3]
    assert info.value.source == "data.csv:5"
    without_audio = [Sample(key="x", source="data.csv:5", media={"image": samples[0].media["image"], "text": ["a"]})]
    with pytest.raises(BadSampleError, match=r"data\.csv:5: has no audio"):
        dataset(without_audio, prep, ("image", "audio"))[0]
    skipping = dataset(corrupt_copy(samples, tmp_path, 3), prep, skip_bad=True)
    assert skipping[3] is None and skipping[2] is not None
    assert len(skipping.bad) == 1 and skipping.bad[0][0] == "data.csv:5" and "broken.png" in skipping.bad[0][1]


def test_cache_keeps_decoded_inputs(samples: list[Sample], prep: Preprocessors, tmp_path: Path) -> None:
    image = tmp_path / "once.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(image)
    one = [Sample(key="0", source="x.csv:2", media={"image": str(image), "text": ["a"]})]
    cached, uncached = dataset(one, prep, ("image",), cache_mb=1), dataset(one, prep, ("image",))
    first = cached[0]["image"]["jitter"]  # a flat colour: the crop changes nothing, the jitter draw does
    uncached[0]
    image.unlink()  # later epochs must not need the file again
    cached.set_epoch(1)
    assert not torch.equal(cached[0]["image"]["jitter"], first)  # re-augmented from the cached array
    with pytest.raises(BadSampleError, match="does not exist"):
        uncached[0]


def test_cache_keeps_the_most_recent_inputs_within_its_byte_budget(prep: Preprocessors, tmp_path: Path) -> None:
    """Three 64x64 RGB images decode to 12 KiB each; a 30 KiB cache keeps the two used last."""
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for i, file in enumerate(files):
        Image.new("RGB", (64, 64), (10 * i, 200, 30)).save(file)
    many = [Sample(key=str(i), source=f"x.csv:{i + 2}", media={"image": str(f)}) for i, f in enumerate(files)]
    cached = dataset(many, prep, ("image",), cache_mb=30 / 1024)
    for i in (0, 1, 0, 2):  # 1 is now the least recently used
        cached[i]
    assert len(cached.cache) == 2 and cached.cache.size == 2 * 64 * 64 * 3 <= cached.cache.budget
    for file in files:
        file.unlink()
    cached[0], cached[2]  # still cached
    with pytest.raises(BadSampleError, match="does not exist"):
        cached[1]
    assert len(dataset(many, prep, ("image",)).cache) == 0  # off by default


def epoch_indices(loader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def test_loader_order_is_a_function_of_seed_and_epoch(samples: list[Sample], prep: Preprocessors) -> None:
    def run(seed: int) -> list[list[list[int]]]:
        loader = build_loader(dataset(samples, prep, ("image",)), 4, True, seed, 0, drop_last=True)
        return [epoch_indices(loader) for _ in range(3)]

    first, second = run(7), run(7)
    assert first == second
    assert first[0] != first[1]  # a new permutation per epoch
    assert run(8) != first
    assert all(sorted(i for batch in epoch for i in batch) == list(range(COUNT)) for epoch in first)
    plain = build_loader(dataset(samples, prep, ("image",)), 5, False, 0, 0, drop_last=False)
    assert len(plain) == 3 and epoch_indices(plain) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"])
        and all(torch.equal(x[m][k], y[m][k]) for m in ("image", "text") if m in x for k in x[m])
        for x, y in zip(a, b, strict=True)
    )


def test_resume_skips_batches_without_decoding_them(samples: list[Sample], prep: Preprocessors) -> None:
    full = build_loader(dataset(samples, prep), 4, True, 1, 0, drop_last=True)
    assert len(full) == 3
    reference = [batch for _ in range(3) for batch in full]  # epochs 0, 1, 2
    resumed_ds = dataset(samples, prep, cache_mb=64)  # the cache tells what was decoded
    resumed = build_loader(resumed_ds, 4, True, 1, 0, drop_last=True, start_step=4)
    batches = iter(resumed)
    first = next(batches)
    assert resumed.epoch == 1
    assert {index for index, *_ in resumed_ds.cache._items} == set(first["index"].tolist())  # skipped: never decoded
    assert same_batches([first, *batches], reference[4:6])  # the rest of epoch 1
    assert same_batches(list(resumed), reference[6:9]) and resumed.epoch == 2  # then whole epochs


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_shards(samples: list[Sample], prep: Preprocessors, drop_last: bool) -> None:
    world, batch_size = 5, 2
    single = build_loader(dataset(samples, prep, ("text",)), batch_size * world, True, 0, 0, drop_last=drop_last)
    ranks = [
        epoch_indices(build_loader(dataset(samples, prep, ("text",)), batch_size, True, 0, 0, drop_last, r, world))
        for r in range(world)
    ]
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen))  # disjoint
    if drop_last:
        assert {len(rank) for rank in ranks} == {1} and len(seen) == world * batch_size  # same step count
        assert sorted(seen) == sorted(epoch_indices(single)[0])  # step s of all ranks = global batch s
    else:
        assert sorted(seen) == list(range(COUNT))  # complete


def test_loader_rejects_impossible_settings(samples: list[Sample], prep: Preprocessors) -> None:
    with pytest.raises(ConfigError, match=r"12 sample\(s\) over 1 rank\(s\) make no full batch of train.batch_size=64"):
        build_loader(dataset(samples, prep), 64, True, 0, 0, drop_last=True)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        build_loader(dataset(samples, prep), 2, True, 0, 0, drop_last=True, rank=2, world_size=2)


def test_workers_give_the_same_batches_and_report_bad_samples(
    samples: list[Sample], prep: Preprocessors, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = corrupt_copy(samples, tmp_path, 3)
    in_process = build_loader(dataset(bad, prep, skip_bad=True), 4, True, 2, 0, drop_last=False)
    main_ds = dataset(bad, prep, skip_bad=True)
    workers = build_loader(main_ds, 4, True, 2, 2, drop_last=False)
    with caplog.at_level("WARNING", logger="codebridge"):
        for _ in range(3):  # the epoch reaches the persistent workers
            assert same_batches(list(in_process), list(workers))
    assert main_ds.bad == [("data.csv:5", main_ds.bad[0][1])]  # distinct samples, not one entry per epoch
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipping bad sample data.csv:5" in m for m in messages) == 2  # once per loader, not per epoch
    assert sum("epoch 2: skipped 1 bad sample(s)" in m for m in messages) == 2  # a total every epoch
    strict = build_loader(dataset(bad, prep), 4, True, 2, 2, drop_last=False)
    with pytest.raises(BadSampleError, match=r"data\.csv:5: image .*broken\.png: .*; fix or remove the file, or pass"):
        list(strict)


def test_resuming_at_the_loader_position_skips_left_out_batches_without_replaying(
    samples: list[Sample], prep: Preprocessors, tmp_path: Path
) -> None:
    bad = dataset(corrupt_copy(samples, tmp_path, 1), prep, skip_bad=True)
    full = build_loader(bad, 1, False, 0, 0, drop_last=False)  # sample 1 alone is an all-bad batch: left out
    stream = iter(full)
    handed = [next(stream)["index"].item() for _ in range(3)]
    assert handed == [0, 2, 3] and full.position == 4  # the left-out batch counts
    resumed = build_loader(bad, 1, False, 0, 0, drop_last=False, start_step=full.position)
    assert resumed.position == 4
    rest = [batch["index"].item() for batch in resumed]
    assert rest == list(range(4, COUNT)) and resumed.position == COUNT  # no replay of 3
