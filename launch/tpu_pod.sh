#!/usr/bin/env bash
# A run on a Cloud TPU pod slice: create the TPU VM slice (if it does not exist), install this checkout on every worker,
# and run the same `python -m dfkd_jax.main` on every worker at once (the command launch/local.sh runs, and
# tests/test_multihost.py tests). jax.distributed finds the workers itself on a TPU VM (dfkd_jax/distributed.py).
#
#   launch/tpu_pod.sh TPU_NAME ZONE ACCELERATOR CONFIG WORKDIR [more flags for dfkd_jax.main ...]
#   launch/tpu_pod.sh dfkd-v4 us-central2-b v4-32 configs/nayer.py:cifar10 gs://my-bucket/nayer_cifar10
#
# Needs gcloud, logged in, with a project set (gcloud config set project ...) and TPU quota in ZONE.
# RUNTIME=... sets the TPU VM software version (default tpu-ubuntu2204-base, for v4; v5e: v2-alpha-tpuv5-lite,
# v6e: v2-alpha-tpuv6e). STEPS=create,install,run chooses the steps (e.g. STEPS=run to start again on an installed
# slice). Run it from the repository root: the checkout (`git archive HEAD`, so commit first) is what gets installed.
#
# WORKDIR is shared by all workers: a gs://BUCKET/PATH is mounted with gcsfuse at /gcs/BUCKET on every worker and the
# run is given /gcs/BUCKET/PATH (the teacher, metrics and images are plain files, and orbax writes its checkpoints
# through the same mount); any other path must already be a filesystem every worker sees at that path.
# Preemption: a preempted TPU VM gets SIGTERM; every process finishes its epoch, writes the checkpoint and exits 0 with
# "preempted after epoch N: run the same command again to resume". Run this script again with the same arguments: it
# recreates the slice if it is gone, and the run resumes from the workdir. The run is in the foreground of the ssh
# session: start this script inside tmux or screen for long runs.
set -euo pipefail

if [ $# -lt 5 ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"  # this header
    exit 2
fi
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
shift 5
runtime=${RUNTIME:-tpu-ubuntu2204-base}
steps=${STEPS:-create,install,run}
on_all_workers() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

if [[ $steps == *create* ]]; then
    if gcloud compute tpus tpu-vm describe "$name" --zone="$zone" > /dev/null 2>&1; then
        echo "tpu_pod.sh: $name exists in $zone"
    else
        gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
            --version="$runtime"
    fi
fi

if [[ $steps == *install* ]]; then
    archive=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$name:dfkd_jax.tar.gz" --zone="$zone" --worker=all
    rm -f "$archive"
    # Python >= 3.11 from uv (the TPU images ship 3.10), then JAX for TPU and this project.
    on_all_workers 'set -e
        rm -rf ~/dfkd_jax && mkdir -p ~/dfkd_jax && tar -xzf ~/dfkd_jax.tar.gz -C ~/dfkd_jax
        command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
        export PATH=$HOME/.local/bin:$PATH
        uv venv --allow-existing -p 3.12 ~/dfkd_venv
        uv pip install -p ~/dfkd_venv "jax[tpu]" -e ~/dfkd_jax'
fi

run_workdir=$workdir
mount=""
if [[ $workdir == gs://* ]]; then
    bucket=${workdir#gs://}
    bucket=${bucket%%/*}
    run_workdir=/gcs/${workdir#gs://}
    # --rename-dir-limit: orbax renames each finished checkpoint's temporary directory into place.
    mount="if ! mountpoint -q /gcs/$bucket; then
        command -v gcsfuse > /dev/null || { export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s);
            echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list;
            curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -;
            sudo apt-get update -q && sudo apt-get install -yq gcsfuse; }
        sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket
        gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket /gcs/$bucket
    fi;"
fi

if [[ $steps == *run* ]]; then
    flags=""
    for flag in "$@"; do flags+=" $(printf '%q' "$flag")"; done
    # The same command on every worker; jax.distributed.initialize() is called by dfkd_jax.main on a TPU VM.
    on_all_workers "set -e; $mount cd ~/dfkd_jax && ~/dfkd_venv/bin/python -m dfkd_jax.main \
        --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$run_workdir")$flags"
fi
