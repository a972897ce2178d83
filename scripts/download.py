"""Download a Hugging Face model repository (weights, config, tokenizer) into checkpoints/<repo_id>."""

import argparse
import os
from pathlib import Path


def download(repo_id: str, hf_token: str | None = None, out_root: Path = Path("checkpoints")) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit("error: downloading needs huggingface_hub: pip install huggingface_hub") from None
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    out = out_root / repo_id
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]
    try:
        snapshot_download(repo_id, local_dir=out, token=hf_token, allow_patterns=patterns)
        if not any(out.glob("*.safetensors")):  # older repositories ship only .bin weights
            snapshot_download(repo_id, local_dir=out, token=hf_token, allow_patterns=["pytorch_model*.bin"])
    except LocalEntryNotFoundError:
        raise SystemExit(f"error: cannot reach the Hugging Face Hub to fetch {repo_id}: check the network") from None
    except HfHubHTTPError as e:
        raise SystemExit(
            f"error: download of {repo_id} failed ({str(e).splitlines()[0]}): gated models need --hf_token"
        ) from None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Download a model from the Hugging Face Hub.")
    p.add_argument("--repo_id", type=str, required=True, help="e.g. meta-llama/Llama-2-7b-chat-hf")
    p.add_argument(
        "--hf_token",
        type=str,
        default=os.environ.get("HF_TOKEN"),
        help="access token for gated models (default: $HF_TOKEN)",
    )
    p.add_argument("--out_root", type=Path, default=Path("checkpoints"), help="folder under which <repo_id> is created")
    a = p.parse_args(argv)
    print(f"Downloaded to {download(a.repo_id, a.hf_token, a.out_root)}")


if __name__ == "__main__":
    main()
