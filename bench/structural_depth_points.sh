# Sourced by bench/gpu_structural_depth.sh and bench/structural_depth_latency.sh: the width ratios and MACs targets
# of the miniature width/depth/both comparison, one place for both scripts (each can be overridden from the env).
# fmnist-unet width: torch-pruning's rule at 0.25 keeps 0.447 of the MACs (WR_UNET=0.3 RULE_UNET=paper
# TARGET_UNET=0.716: the paper rule's point); fmnist-dit width 0.45 keeps 0.552. Depth removes units until the MACs
# come closest to the target; "both" prunes a smaller width (fmnist-unet 0.2 by the paper rule, fmnist-dit 0.25),
# then units.
WR_UNET=${WR_UNET:-0.25}; RULE_UNET=${RULE_UNET:-tp}; TARGET_UNET=${TARGET_UNET:-0.447}
WR_BOTH_UNET=${WR_BOTH_UNET:-0.2}
WR_DIT=${WR_DIT:-0.45}; TARGET_DIT=${TARGET_DIT:-0.552}; WR_BOTH_DIT=${WR_BOTH_DIT:-0.25}
# MODEL VARIANT -> $target $wr $rule for bench/prune_to_macs.py
depth_point() {
  if [ "$1" = fmnist-unet ]; then
    target=$TARGET_UNET wr=$WR_UNET rule="--rule $RULE_UNET"
    [ "$2" = both ] && wr=$WR_BOTH_UNET rule=""   # tp's rule halves the 64-channel level at any ratio
  else
    target=$TARGET_DIT wr=$WR_DIT rule=""; [ "$2" = both ] && wr=$WR_BOTH_DIT
  fi
}
