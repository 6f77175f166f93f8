# Step timing and loud failure for the proof scripts (sourced, not run).
# The sourcing script sets STEPS_LABEL (chart, image) and calls `step NAME`
# before each step, `end_step` after the last, and `die MESSAGE` to fail.
# shellcheck shell=bash

step_name=""
step_started=0
summary=()

step() {
    end_step
    step_name=$1
    step_started=$(date +%s%N)
    echo "== $STEPS_LABEL: $step_name"
}

end_step() {
    if [[ -n $step_name ]]; then
        local ms=$((($(date +%s%N) - step_started) / 1000000))
        local line
        line=$(printf '%4d.%ds  %s' $((ms / 1000)) $((ms % 1000 / 100)) "$step_name")
        summary+=("$line")
        echo "   done in ${line%%s  *}s"
    fi
    step_name=""
}

die() {
    echo "" >&2
    echo "!! scripts/$STEPS_LABEL.sh FAILED in step '${step_name:-setup}': $*" >&2
    exit 1
}
