#!/usr/bin/env bash
# Trains the evaluation zoo's clean bases (issue #23) from their registered recipes (bdscan/lab/recipes.py),
# in dependency order: each data set's ResNet-18 before its DeiT, which distils from it.
#
# Resumable: every model writes a checkpoint after each epoch; run the same command again and it continues
# after the last finished epoch, skipping the bases already written with the same recipe.
#
# On the 2-core CPU host (background, lowest priority, one torch thread; ~45 min per GTSRB base,
# ~2.5 h per CIFAR-10 base):
#   mkdir -p /work/zoo-runs && nohup nice -n 19 benchmarks/zoo/train_bases.sh --out /work/zoo-runs/bases \
#       > /work/zoo-runs/train_bases.log 2>&1 &
# On a GPU machine (all 12 bases, data-loading workers, bf16 autocast where the GPU has it):
#   benchmarks/zoo/train_bases.sh --device cuda --out benchmarks/zoo/bases
# Options:
#   --out DIR            where the bases (<dataset>_<arch>_base.safetensors), checkpoints and per-epoch
#                        histories (<name>.history.json) go (default: benchmarks/zoo/bases)
#   --device DEV         cpu (default), cuda, cuda:N, auto
#   --threads N          torch threads (default 1 on cpu, 4 on cuda)
#   --workers N          data-loading processes (default 0 on cpu, 6 on cuda)
#   --datasets "A B"     default "gtsrb cifar10"
#   --archs "A B ..."    default "bdscan_cnn6 bdscan_resnet18 bdscan_vit bdscan_deit bdscan_cct bdscan_convit"
#   --data-dir DIR       folder with gtsrb_32.npz, cifar10_32.npz, cifar10_train_extra_32.npz (default: shared/data)
#   --python PY          interpreter (default: python)
set -euo pipefail

out=benchmarks/zoo/bases
device=cpu
threads=""
workers=""
datasets="gtsrb cifar10"
archs="bdscan_cnn6 bdscan_resnet18 bdscan_vit bdscan_deit bdscan_cct bdscan_convit"
data_dir=""
py=python
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --datasets) datasets=$2; shift 2 ;;
        --archs) archs=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        --python) py=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "train_bases.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$threads" ]; then
    case "$device" in cuda*) threads=4 ;; *) threads=1 ;; esac
fi

# ResNet-18 before DeiT wherever both are asked for: DeiT distils from the ResNet-18 base of its data set.
ordered=""
for a in $archs; do
    case " $ordered " in *" $a "*) continue ;; esac
    if [ "$a" = bdscan_deit ]; then
        if echo " $archs " | grep -q " bdscan_resnet18 "; then
            case " $ordered " in *" bdscan_resnet18 "*) ;; *) ordered="$ordered bdscan_resnet18" ;; esac
        else
            echo "train_bases.sh: note: bdscan_deit needs <dataset>_resnet18_base.safetensors in $out" >&2
        fi
    fi
    ordered="$ordered $a"
done

extra=()
[ -n "$data_dir" ] && extra+=(--data-dir "$data_dir")
[ -n "$workers" ] && extra+=(--workers "$workers")
mkdir -p "$out"
for ds in $datasets; do
    for arch in $ordered; do
        echo "== $(date -u +%FT%TZ) $ds $arch" >&2
        "$py" -m bdscan.lab.zoo train-base --dataset "$ds" --arch "$arch" --out "$out" \
            --device "$device" --threads "$threads" "${extra[@]}"
    done
done
echo "== $(date -u +%FT%TZ) all bases done" >&2
