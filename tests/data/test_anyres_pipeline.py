"""Any-resolution images through the training pipeline: tiles and layout equal to inference's,
placeholders per image from its size, the per-slot budget (reject / downscale, counted),
packing, and the train step's loss on such a batch equal to the model's on the same images."""

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from llava_jax.data import anyres as data_anyres
from llava_jax.data import pipeline as P
from llava_jax.data import synthetic as sy
from llava_jax.data.anyres_example import downscaled_size
from llava_jax.data.images import image_config_for, load_image
from llava_jax.data.tokenize import IGNORE
from llava_jax.models import anyres, configs
from llava_jax.models.llava import Llava, init_params
from llava_jax.tokenizer import load_tokenizer
from llava_jax.train import step as step_lib

PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))  # S = 28: at most 2x2 tiles
# (height, width): wide (1x3 tiles), tall (3x1), square 2x2, smaller than a tile, a sliver.
SIZES = [(40, 100), (90, 30), (60, 60), (20, 20), (300, 12)]
MAX_LEN = 320


def _cfg(tok, **anyres_fields):
  vision = configs.VISION_VARIANTS["clip-tiny"]
  llm = dataclasses.replace(
      configs.LLM_VARIANTS["tiny"], vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2
  )
  fields = dict(image_grid_pinpoints=PINPOINTS) | anyres_fields
  return configs.llava_config(vision, llm, image_token_id=tok.token_to_id(sy.IMAGE_TOKEN), **fields)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("anyres")
  paths = sy.write_synthetic(d / "shapes", seed=0, n_train=8, n_val=2, image_size=28)
  tok = load_tokenizer(paths["tokenizer"])
  rng = np.random.default_rng(0)
  files = []
  for k, (h, w) in enumerate(SIZES):
    f = d / f"img{k}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f)
    files.append(str(f))

  def turn(n_images, k):
    return [
        {"from": "human", "value": "<image>\n" * n_images + f"What is in picture {k}?"},
        {"from": "gpt", "value": f"shapes {k}"},
    ]

  records = [{"id": f"one-{k}", "images": [f], "conversations": turn(1, k)} for k, f in enumerate(files)]
  records.append({"id": "two", "images": files[:2], "conversations": turn(2, 9)})
  records.append({"id": "text", "images": [], "conversations": turn(0, 7)})
  return tok, records, files


def _pipeline(tok, cfg, *, batch_size=len(SIZES) + 2, **over):
  spec_over = {k: over.pop(k) for k in ("over_budget", "max_images") if k in over}
  spec = P.ExampleSpec.for_model(
      cfg,
      tokenizer=tok,
      template="llava_v1",
      image_config=image_config_for("clip", 28),
      max_len=MAX_LEN,
      max_images=spec_over.pop("max_images", 2),
      **spec_over,
  )
  kw = dict(batch_size=batch_size, seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1)
  return spec, P.PipelineConfig(spec, **(kw | over))


def test_rows_carry_the_tiles_and_layout_inference_uses(data):
  tok, records, _ = data
  cfg = _cfg(tok)
  spec, pc = _pipeline(tok, cfg)
  (batch,) = list(P.make_dataset(records, pc))
  p, n = cfg.tiles_per_image, cfg.image_token_budget
  assert set(batch) == set(spec.keys())
  assert batch["pixel_values"].shape == (len(records), 2, p, 28, 28, 3)
  assert batch["image_index"].shape == (len(records), 2, n, 1) and batch["image_index"].dtype == np.int32
  assert batch["image_weight"].dtype == np.float32 and batch["image_tokens"].dtype == np.int32
  image_id = cfg.image_token_id
  for row, rid in enumerate(batch["ids"]):
    rec = next(r for r in records if r["id"] == rid)
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    sizes = [load_image(f).size[::-1] for f in rec["images"]]
    want = [anyres.num_image_tokens(s, cfg) for s in sizes]
    assert batch["image_tokens"][row].tolist() == want + [0] * (2 - len(want))
    assert int((ids == image_id).sum()) == sum(want) and not (labels[ids == image_id] != IGNORE).any()
    assert batch["image_mask"][row].tolist() == [k < len(sizes) for k in range(2)]
    if sizes:  # the layout of inference (models.anyres.image_layout of the original sizes)
      layout = anyres.image_layout(np.asarray(sizes), cfg)
      np.testing.assert_array_equal(batch["image_index"][row, : len(sizes)], layout.index)
      np.testing.assert_array_equal(batch["image_weight"][row, : len(sizes)], layout.weight)
    for k, f in enumerate(rec["images"]):
      tiles, _ = data_anyres.preprocess_anyres(load_image(f), image_config_for("clip", 28), PINPOINTS)
      np.testing.assert_array_equal(batch["pixel_values"][row, k], data_anyres.pad_tiles(tiles, p))
    assert not batch["pixel_values"][row, len(sizes) :].any() and not batch["image_index"][row, len(sizes) :].any()


def test_train_step_loss_on_an_anyres_batch_is_the_models(data):
  """loss_fn on the [B, M, P, ...] batch == token_loss of Llava on the flat images with
  the layout from their sizes (the inference path)."""
  tok, records, _ = data
  cfg = _cfg(tok)
  _, pc = _pipeline(tok, cfg)
  (batch,) = list(P.make_dataset(records, pc))
  params = init_params(cfg, jax.random.key(0))
  model_batch = {k: batch[k] for k in step_lib.model_keys(cfg)}
  loss, aux = step_lib.loss_fn(params, model_batch, cfg, step_lib.StepConfig())
  real = batch["image_mask"].reshape(-1)
  sizes = []
  for rid in batch["ids"]:
    rec = next(r for r in records if r["id"] == rid)
    sizes += [load_image(f).size[::-1] for f in rec["images"]]
  flat_px = batch["pixel_values"].reshape((-1,) + batch["pixel_values"].shape[2:])[real]
  logits = Llava(cfg).apply(
      {"params": params},
      batch["input_ids"],
      flat_px,
      batch["attention_mask"],
      image_layout=anyres.image_layout(np.asarray(sizes), cfg),
  )
  nll, w, _ = step_lib.token_loss(logits, batch["labels"], batch["attention_mask"])
  np.testing.assert_allclose(float(loss), float((nll * w).sum() / w.sum()), rtol=1e-6)
  assert float(aux["tokens"]) == float(w.sum()) > 0


def test_over_budget_images_are_rejected_or_downscaled_and_counted(data, caplog):
  tok, records, files = data
  cfg = _cfg(tok, max_tiles_per_image=3)  # 1x2 grids fit; 1x3, 3x1 and 2x2 do not
  big = [k for k, s in enumerate(SIZES) if data_anyres.num_tiles(s, PINPOINTS, 28) > 3]
  assert big == [0, 1, 2, 4]
  singles = records[: len(SIZES)]

  _, pc = _pipeline(tok, cfg, drop_remainder=False)
  it = P.make_dataset(singles, pc)
  batches = list(it)
  assert it.counts()["image_over_budget"] == len(big)
  assert [i for b in batches for i in b["ids"] if i] == ["one-3"]
  assert "one-0" in caplog.text and "max_tiles_per_image=3" in caplog.text and "downscale" in caplog.text

  _, pc = _pipeline(tok, cfg, policy="raise")
  with pytest.raises(ValueError, match=r"one-0.*image_over_budget.*40x100"):
    list(P.make_dataset(singles, pc))

  _, pc = _pipeline(tok, cfg, over_budget="downscale", batch_size=len(singles))
  it = P.make_dataset(singles, pc)
  (batch,) = list(it)
  assert it.counts()["image_over_budget"] == 0 and it.notes() == {"image_downscaled": len(big)}
  for row, rid in enumerate(batch["ids"]):
    k = int(rid.split("-")[1])
    img = load_image(files[k])
    if k in big:
      h, w = downscaled_size(img.size[::-1], cfg)
      assert (h / img.size[1]) == pytest.approx(w / img.size[0], rel=0.2)  # aspect kept (integer sides)
      img = img.resize((w, h), resample=Image.BICUBIC)
    fitted = img.size[::-1]
    n = anyres.num_image_tokens(fitted, cfg)
    assert batch["image_tokens"][row, 0] == n and (batch["input_ids"][row] == cfg.image_token_id).sum() == n
    tiles, _ = data_anyres.preprocess_anyres(img, image_config_for("clip", 28), PINPOINTS)
    np.testing.assert_array_equal(batch["pixel_values"][row, 0], data_anyres.pad_tiles(tiles, 3))


def test_packed_anyres_rows_keep_each_image_with_its_layout(data):
  tok, records, _ = data
  cfg = _cfg(tok)
  _, pc = _pipeline(tok, cfg, batch_size=2, pack=True, max_images=4, num_epochs=None, drop_remainder=True)
  it = P.make_dataset(records, pc)
  for _ in range(3):
    b = next(it)
    for row in range(2):
      seg = b["attention_mask"][row]
      assert (b["input_ids"][row] == cfg.image_token_id).sum() == b["image_tokens"][row].sum()
      np.testing.assert_array_equal(b["image_mask"][row], b["image_tokens"][row] > 0)
      assert seg.max() >= 1
  # Every packed image's layout is the one its size gives (index rows past its tokens are zero).
  for row in range(2):
    for j in np.flatnonzero(b["image_mask"][row]):
      t = b["image_tokens"][row, j]
      assert b["image_weight"][row, j, :t].sum() > 0 and not b["image_weight"][row, j, t:].any()


def test_onevision_samples_of_several_images_take_one_square_tile_each(data):
  """OneVision (anyres_max_N): a sample of two images gives each one padded square tile and
  its base features + newline, as transformers' processor and model do
  (tests/models/test_llava_next.py); a single image is still tiled."""
  tok, records, files = data
  cfg = _cfg(tok, vision_aspect_ratio="anyres_max_1")
  _, pc = _pipeline(tok, cfg)
  (batch,) = list(P.make_dataset(records, pc))
  ids = list(batch["ids"])
  row, n = ids.index("two"), cfg.vision.num_features
  assert batch["image_tokens"][row].tolist() == [n + 1, n + 1]
  assert (batch["input_ids"][row] == cfg.image_token_id).sum() == 2 * (n + 1)
  for k, f in enumerate(files[:2]):
    tiles, _ = data_anyres.preprocess_square(load_image(f), image_config_for("clip", 28))
    np.testing.assert_array_equal(batch["pixel_values"][row, k], data_anyres.pad_tiles(tiles, cfg.tiles_per_image))
  one = ids.index("one-0")
  assert batch["image_tokens"][one, 0] == anyres.num_image_tokens(SIZES[0], cfg) != n + 1
