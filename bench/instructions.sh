#!/usr/bin/env bash
# Instructions per streamed task, counted by callgrind: a measure of CPU
# work that this machine's 10-20% drift in speed does not move, for
# comparing two builds side by side (bench/README.md). Each binary runs the
# stream bench twice under valgrind, with TASKS and with 20,000 tasks; the
# difference divided by the difference in tasks leaves out start-up and the
# unary baseline phase (20,000 GetStats calls either way: `taskq bench`
# makes min(tasks, 20000) of them). The two binaries run at the same time, one core
# each. Counts user-space instructions only (not the kernel's TCP work, nor
# cache misses); under valgrind threads take turns, so batches differ in
# size from a real run. Runs of the same binary agree within about 3%.
#
#   bench/instructions.sh BINARY_A BINARY_B [TASKS]   # default 60000, more than 20000
set -euo pipefail
command -v valgrind >/dev/null || { echo "bench/instructions.sh: needs valgrind (Debian: apt-get install valgrind)" >&2; exit 1; }
[ $# -ge 2 ] || { echo "usage: bench/instructions.sh BINARY_A BINARY_B [TASKS]" >&2; exit 2; }
a=$1 b=$2 tasks=${3:-60000}
few=20000
[ "$tasks" -gt "$few" ] || { echo "bench/instructions.sh: TASKS must be more than $few" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() { # binary tasks label
  valgrind --tool=callgrind --callgrind-out-file="$out/$3.cg" "$1" bench --mode stream \
    --tasks "$2" --workers 4 --concurrency 256 --payload-bytes 8 --fill 0 --producers 4 \
    --batch 256 --timeout 600s > "$out/$3.log" 2>&1
  grep -o 'Collected : [0-9]*' "$out/$3.log" | grep -o '[0-9]*$'
}
for n in "$tasks" "$few"; do
  count "$a" "$n" "a$n" > "$out/a$n" &
  count "$b" "$n" "b$n" > "$out/b$n" &
  wait
done
per_task() { echo $(( ($(cat "$out/${1}$tasks") - $(cat "$out/${1}$few")) / (tasks - few) )); }
ia=$(per_task a) ib=$(per_task b)
echo "instructions per task: A $ia ($a), B $ib ($b), B/A $(python3 -c "print(f'{$ib/$ia:.3f}')")"
