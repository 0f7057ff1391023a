"""Share an AUSteer adapter through the Hugging Face Hub: save it, push it, pull it and load it back.

By default this runs offline in a few seconds: a local stand-in for the Hub takes the upload (at the same
`HfApi.create_commit` call a real push makes) and stores it in a Hub cache folder laid out exactly as huggingface_hub
lays out downloads, so pulling goes through huggingface_hub's real cache lookup with HF_HUB_OFFLINE=1. The base model
is a tiny random Llama "published" the same way.

    python examples/hub.py                                  # offline round trip
    python examples/hub.py --repo-id your-name/austeer-demo # the real Hub (after `hf auth login`)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo-id", help="push to this repository on the real Hub instead of the local stand-in")
parser.add_argument("--workdir", type=Path, help="where to keep the files (default: a temporary folder)")
args = parser.parse_args()
workdir = args.workdir or Path(tempfile.mkdtemp(prefix="austeer-hub-"))
if args.repo_id is None:
    # huggingface_hub reads these when it is imported, so they are set first.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(workdir / "hub-cache")

import warnings  # noqa: E402

import torch  # noqa: E402
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl  # noqa: E402
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import austeer_peft  # noqa: E402  (registers AUSteer with PEFT)
from austeer_peft.cli import main as austeer  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Could not find a config file")  # PEFT's vocabulary check, offline


@contextmanager
def local_hub(cache: Path):
    """Stand-in for the Hub: commits land in `cache` as `models--<user>--<name>/snapshots/<commit>/...` with
    `refs/main` naming the latest commit, which is where huggingface_hub looks for downloaded files."""

    def create_repo(api, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(api, repo_id, operations, commit_message=None, **kwargs):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        oid = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(files.items()))).hexdigest()
        for name, data in files.items():
            (repo / "snapshots" / oid / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / oid / name).write_bytes(data)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(oid)
        print(f"  [local hub] {repo_id}: {', '.join(f'{n} ({len(d):,} B)' for n, d in sorted(files.items()))}")
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message=commit_message,
                          commit_description="", oid=oid)

    saved = HfApi.create_repo, HfApi.create_commit
    HfApi.create_repo, HfApi.create_commit = create_repo, create_commit
    try:
        yield
    finally:
        HfApi.create_repo, HfApi.create_commit = saved


def publish_folder(cache: Path, repo_id: str, folder: Path) -> None:
    """Put a saved model into the local hub, as if someone had uploaded it."""
    from huggingface_hub import CommitOperationAdd

    with local_hub(cache):
        HfApi().create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                                                   for p in sorted(folder.iterdir())], commit_message="base model")


def tiny_base() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


input_ids = torch.tensor([[1, 17, 42, 99, 5, 63]])
cache = workdir / "hub-cache"

# 1. A base model on the "Hub" and an adapter for it. (Real AUs come from `austeer_peft.fit_austeer(...)`; here a few
#    are set by hand: dimension 84 of layer 3's attention output projection input, promoted with γ = 4, and so on.)
if args.repo_id is None:
    tiny_base().save_pretrained(workdir / "base")
    publish_folder(cache, "demo/tiny-llama", workdir / "base")
    base = AutoModelForCausalLM.from_pretrained("demo/tiny-llama").eval()  # resolved from the cache, offline
else:
    base = tiny_base()
model = get_peft_model(base, austeer_peft.AUSteerConfig(sites=["attention", "ffn"], k=4, alpha=4.0))
model.set_aus([(("attention", 3), 16 + 4, 4.0), (("attention", 1), 7, -0.5), (("ffn", 2), 11, 1.5),
               (("ffn", 0), 30, -0.8)])
with torch.no_grad():
    steered = model(input_ids).logits

# 2. Save: adapter_config.json, adapter_model.safetensors (a few hundred bytes) and the AUSteer model card.
adapter_dir = workdir / "adapter"
model.save_pretrained(adapter_dir)
print(f"Saved to {adapter_dir}:")
for path in sorted(adapter_dir.iterdir()):
    print(f"  {path.name:28} {path.stat().st_size:>6,} bytes")

# 3. Push: the same three files, in one commit (model.push_to_hub, or `austeer push --adapter DIR --repo-id ID`).
repo_id = args.repo_id or "demo/austeer-tiny-llama"
print(f"Pushing to {repo_id}:")
if args.repo_id is None:
    with local_hub(cache):
        model.push_to_hub(repo_id)
else:
    print(" ", model.push_to_hub(repo_id).commit_url)

# 4. Pull: PEFT resolves the repository id through the Hub client (here its offline cache).
fresh_base = AutoModelForCausalLM.from_pretrained("demo/tiny-llama") if args.repo_id is None else tiny_base()
pulled = PeftModel.from_pretrained(fresh_base.eval(), repo_id)
with torch.no_grad():
    assert torch.equal(pulled(input_ids).logits, steered)
aus = ", ".join(f"{au.module}[{au.dim}] γ={au.gamma:g}" for au in pulled.get_aus())
print(f"Pulled {repo_id} with PeftModel.from_pretrained: same logits; AUs {aus}")
if args.repo_id is None:  # the base model is on the (local) Hub too, so AutoPeftModel finds both
    auto = AutoPeftModelForCausalLM.from_pretrained(repo_id).eval()
    with torch.no_grad():
        assert torch.equal(auto(input_ids).logits, steered)
    print("AutoPeftModelForCausalLM.from_pretrained loads base and adapter: same logits")

card = ModelCard.load(repo_id)
print(f"Model card: base_model={card.data.base_model}, tags={card.data.tags}")
print(f"\n$ austeer inspect {repo_id}")
austeer(["inspect", repo_id])
