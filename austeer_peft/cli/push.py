"""``austeer push``: upload a saved adapter and its model card to the Hugging Face Hub in one commit."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..hub.export import push_to_hub
from .command import Command


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, type=Path,
                        help="folder an adapter was saved to (peft_model.save_pretrained(folder))")
    parser.add_argument("--repo-id", required=True,
                        help="Hub repository, e.g. your-name/my-adapter (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload AUSteer adapter')")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`, or HF_TOKEN)")
    parser.add_argument("--tag", action="append", dest="tags", default=None, metavar="TAG",
                        help="extra tag for the model card (repeatable)")


def run_push(args: argparse.Namespace) -> int:
    commit = push_to_hub(args.adapter, args.repo_id, commit_message=args.commit_message,
                         private=True if args.private else None, token=args.token, revision=args.revision,
                         create_pr=args.create_pr, tags=args.tags)
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or args.repo_id
    print(f"Pushed {args.adapter} to {args.repo_id}: {url}")
    return 0


COMMAND = Command(
    "push", "upload a saved adapter and its model card to the Hugging Face Hub",
    "Upload adapter_config.json, adapter_model.safetensors and the model card (README.md) of a saved\n"
    "AUSteer adapter in one commit. The card written by save_pretrained is uploaded as it is; a folder\n"
    "without one gets a card made from its files. Log in first with `hf auth login` (or set HF_TOKEN).\n\n"
    "example:\n  austeer push --adapter out/adapter --repo-id your-name/my-adapter",
    add_push_arguments, run_push,
)
