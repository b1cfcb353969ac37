"""Fixtures shared by the data tests: a small LLaVA JSON / JSONL file pair and its images."""

import json

import numpy as np
import pytest
from PIL import Image

TRICKY = 'say "hi" [a, {b}] \\ , ] } \u00e9'  # structure characters and escapes inside strings


def _records():
  recs = []
  for i in range(5):
    recs.append(
        {
            "id": f"r{i}",
            "image": f"img{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{TRICKY} {i}"},
                {"from": "gpt", "value": f"answer, {i}"},
            ],
        }
    )
  recs.append(
      {
          "id": "multi",
          "image": ["img0.png", "img1.png"],
          "conversations": [{"from": "human", "value": "<image>\n<image>\nsame?"}, {"from": "gpt", "value": "no"}],
      }
  )
  recs.append({"id": 17, "images": ["img2.png"], "conversations": []})  # "images" key, numeric id
  recs.append({"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]})
  return recs


@pytest.fixture()
def llava_files(tmp_path):
  """(directory, records): the records as a.json and a.jsonl, and the images they name."""
  recs = _records()
  for i in range(5):
    Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"img{i}.png")
  Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(tmp_path / "img5.bmp")
  with open(tmp_path / "a.json", "w") as f:
    json.dump(recs, f, indent=2, ensure_ascii=False)
  with open(tmp_path / "a.jsonl", "w", newline="") as f:  # CRLF endings, a blank line, no final newline
    f.write("\r\n".join(json.dumps(r) for r in recs[:3]) + "\r\n\r\n" + "\n".join(json.dumps(r) for r in recs[3:]))
  return tmp_path, recs
