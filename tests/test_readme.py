"""Every Python block of the README runs: the library example as written, the model example on a tiny
Hugging Face checkpoint the test writes in place of /ckpt/Qwen3-0.6B."""

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    code = BLOCKS[index]
    if "/ckpt/Qwen3-0.6B" in code:
        tokenizers = pytest.importorskip("tokenizers")
        from tests.hf_models import make_hf_model

        ckpt = tmp_path / "Qwen3-0.6B"
        make_hf_model("qwen3").save_pretrained(ckpt)
        words = ["<pad>", "<unk>", "</s>", "Hello", "world"] + [f"w{i}" for i in range(5, 90)]
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        tok.save(str(ckpt / "tokenizer.json"))
        (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
        code = code.replace("/ckpt/Qwen3-0.6B", str(ckpt)).replace("/tmp/export", str(tmp_path / "export"))
    namespace: dict = {}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "loss" in namespace:
        import numpy as np

        assert np.isfinite(float(namespace["loss"])) and namespace["per_thought"].shape == (8,)
    if "logits" in namespace:
        assert namespace["logits"].shape[:2] == (1, 2) and (tmp_path / "export" / "config.json").exists()
