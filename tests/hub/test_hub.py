"""Hub sharing without a network: uploads are caught at the huggingface_hub boundary (HfApi.create_repo /
create_commit) and land in a cache laid out as the Hub client lays it out, which downloads then resolve through
huggingface_hub's real cache lookup in offline mode."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from austeer_peft import AUSteerConfig, AUSteerLayer, push_to_hub, save_adapter
from austeer_peft.cli import main

ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


class FakeHub:
    """The Hub as seen through ``HfApi``: each commit is recorded and written into a local cache laid out like the
    client's own (``models--user--name/refs/main`` naming a commit, ``snapshots/<commit>/<files>``)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        self.branches: list[tuple[str, str]] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api, repo_id, *, branch, **kwargs):
        self.branches.append((repo_id, branch))

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (str, Path)):
                files[operation.path_in_repo] = Path(source).read_bytes()
            elif isinstance(source, bytes):
                files[operation.path_in_repo] = source
            else:
                files[operation.path_in_repo] = source.read() if isinstance(source, io.IOBase) else bytes(source)
            assert operation.upload_info.size == len(files[operation.path_in_repo])
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        oid = self.lay_out(repo_id, files, kwargs.get("revision") or "main")
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                          commit_message=kwargs.get("commit_message"), commit_description="", oid=oid)

    def lay_out(self, repo_id: str, files: dict, revision: str = "main") -> str:
        """Put files into the cache as the latest commit of ``repo_id`` (on top of the previous one)."""
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        ref = repo / "refs" / revision
        tree = {}
        if ref.exists():
            previous = repo / "snapshots" / ref.read_text()
            tree = {p.relative_to(previous).as_posix(): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
        tree.update(files)
        oid = hashlib.sha1(json.dumps({k: hashlib.sha1(v).hexdigest() for k, v in sorted(tree.items())}).encode())
        oid = oid.hexdigest()
        for name, data in tree.items():
            path = repo / "snapshots" / oid / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(oid)
        return oid

    def lay_out_folder(self, repo_id: str, folder: Path) -> str:
        return self.lay_out(repo_id, {p.relative_to(folder).as_posix(): p.read_bytes()
                                      for p in folder.rglob("*") if p.is_file()})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Offline Hub client with its cache in tmp_path. huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE
    into `huggingface_hub.constants` at import time and PEFT also reads os.environ, so both are patched."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake = FakeHub(cache)
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: fake.create_branch(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw:
                        fake.create_commit(api, repo_id, operations, **kw))
    return fake


def steered_model(family="llama", base_id=None, **kwargs):
    base = tiny_model(family, **kwargs)
    if base_id is not None:  # as if loaded with from_pretrained(base_id)
        base.name_or_path = base_id
    model = get_peft_model(base, AUSteerConfig(sites=["attention", "ffn"], k=3, alpha=4.0))
    model.set_aus([(("attention", 0), 3, 1.5), (("attention", 1), 7, -0.5), (("ffn", 1), 2, 2.0)])
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_push_to_hub_uploads_what_save_adapter_writes(hub, tmp_path):
    model = steered_model()
    save_adapter(model, tmp_path / "saved")
    push_to_hub(model, "user/name", commit_message="first AUSteer adapter")

    assert [repo["repo_id"] for repo in hub.repos] == ["user/name"]
    (commit,) = hub.commits
    assert commit["repo_id"] == "user/name" and commit["commit_message"] == "first AUSteer adapter"
    assert set(commit["files"]) == ADAPTER_FILES
    for name, data in commit["files"].items():
        assert data == (tmp_path / "saved" / name).read_bytes(), name
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.library_name == "peft" and "austeer" in card.data.tags
    assert "More Information Needed" not in card.content


def test_push_to_hub_passes_repo_options(hub):
    push_to_hub(steered_model(), "user/name", private=True, revision="dev", create_pr=False, tags=["sentiment"])
    assert hub.repos[0]["private"] is True
    assert hub.branches == [("user/name", "dev")]
    commit = hub.commits[0]
    assert commit["revision"] == "dev"
    assert "sentiment" in ModelCard(commit["files"]["README.md"].decode()).data.tags


def test_push_pull_round_trip_through_the_cache(hub, tmp_path, input_ids):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    hub.lay_out_folder("org/tiny-llama", tmp_path / "base")
    model = steered_model(base_id="org/tiny-llama")
    steered = logits(model, input_ids)
    push_to_hub(model, "user/name")

    assert json.loads(hub.commits[0]["files"]["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-llama"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("org/tiny-llama"), "user/name")
    assert torch.equal(logits(loaded, input_ids), steered)
    assert sorted(loaded.get_aus()) == sorted(model.get_aus())

    auto = AutoPeftModelForCausalLM.from_pretrained("user/name")  # the base model resolves from the cache too
    assert torch.equal(logits(auto.eval(), input_ids), steered)
    assert ModelCard.load("user/name").data.base_model == "org/tiny-llama"  # the card, from the cache as well


def test_loaded_adapter_pushes_again_with_the_austeer_card(hub, tmp_path):
    model = steered_model()
    save_adapter(model, tmp_path / "saved")
    hub.lay_out_folder("user/name", tmp_path / "saved")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), "user/name")
    push_to_hub(loaded, "user/copy")
    assert set(hub.commits[0]["files"]) == ADAPTER_FILES
    for name, data in hub.commits[0]["files"].items():
        if name != "README.md":  # the card may differ only in the recorded base model
            assert data == (tmp_path / "saved" / name).read_bytes(), name
    assert "austeer" in ModelCard(hub.commits[0]["files"]["README.md"].decode()).data.tags


@pytest.mark.parametrize("other, shapes", [
    (lambda: tiny_model("llama", layers=1), r"width 32.*no such module.*1 layers"),
    (lambda: tiny_model("llama", hidden=64), r"width 32, the model has width 64"),
    (lambda: tiny_model("mistral"), r"made for a 'llama' model, but the base model is 'mistral'"),
])
def test_mismatched_base_from_the_hub_is_refused_before_any_change(hub, tmp_path, other, shapes):
    model = steered_model()
    model.save_pretrained(tmp_path / "saved")
    hub.lay_out_folder("user/name", tmp_path / "saved")
    base = other()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=shapes):
        PeftModel.from_pretrained(base, "user/name")
    assert not any(isinstance(m, AUSteerLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_cli_push_uploads_the_saved_folder(hub, tmp_path, capsys):
    save_adapter(steered_model(), tmp_path / "saved")
    assert main(["push", "--adapter", str(tmp_path / "saved"), "--repo-id", "user/name", "--private"]) == 0
    assert "user/name" in capsys.readouterr().out
    (commit,) = hub.commits
    assert set(commit["files"]) == ADAPTER_FILES
    for name, data in commit["files"].items():
        assert data == (tmp_path / "saved" / name).read_bytes(), name
    assert hub.repos[0]["private"] is True


def test_cli_push_writes_a_card_for_a_folder_without_one(hub, tmp_path):
    save_adapter(steered_model(), tmp_path / "saved")
    saved_card = (tmp_path / "saved" / "README.md").read_text()
    (tmp_path / "saved" / "README.md").write_text("# my notes\n")
    assert main(["push", "--adapter", str(tmp_path / "saved"), "--repo-id", "user/name", "--tag", "demo"]) == 0
    card = ModelCard(hub.commits[0]["files"]["README.md"].decode())
    assert card.data.tags == ["austeer", "activation-steering", "peft", "demo"]
    assert card.text.strip() == ModelCard(saved_card).text.strip()  # same body as the card save_adapter wrote
    assert (tmp_path / "saved" / "README.md").read_text() == "# my notes\n"  # the folder is left alone


def test_cli_push_refuses_a_folder_that_is_not_an_adapter(hub, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["push", "--adapter", str(tmp_path / "empty"), "--repo-id", "user/name"]) == 1
    assert "not a saved AUSteer adapter" in capsys.readouterr().err
    assert hub.commits == []


def test_cli_inspect_and_merge_take_hub_ids(hub, tmp_path, capsys, input_ids):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(101)},
                                                                                   unk_token="t0")),
                                        eos_token="t2", pad_token="t0")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    hub.lay_out_folder("org/tiny-llama", tmp_path / "base")
    model = steered_model(base_id="org/tiny-llama")
    steered = logits(model, input_ids)
    push_to_hub(model, "user/name")

    assert main(["inspect", "user/name"]) == 0
    out = capsys.readouterr().out
    assert "org/tiny-llama (llama)" in out and "3 AUs in 3 modules" in out

    assert main(["merge", "--model", "org/tiny-llama", "--adapter", "user/name", "--output", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(merged, input_ids), steered, rtol=0, atol=1e-5)
