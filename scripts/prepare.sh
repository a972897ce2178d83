#!/usr/bin/env bash
# Download a Hugging Face model, convert it to model.pth, and optionally quantize it.
# usage: ./scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf [int8] [int4] ...
set -euo pipefail
repo="${1:?usage: $0 <hf-repo-id> [int8|int4|int4-gptq ...]}"
shift
here="$(cd "$(dirname "$0")/.." && pwd)"
python "$here/scripts/download.py" --repo_id "$repo"
python "$here/scripts/convert_hf_checkpoint.py" --checkpoint_dir "checkpoints/$repo"
for mode in "$@"; do
  python "$here/quantize.py" --checkpoint_path "checkpoints/$repo/model.pth" --mode "$mode"
done
