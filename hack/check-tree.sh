#!/usr/bin/env bash
# Fails when the repository tracks a build output: a compiled executable
# (ELF), a file with the executable bit that is not a script, or a file over
# 1 MB that hack/large-files.txt does not list as a documented fixture.
set -euo pipefail
cd "$(dirname "$0")/.."

limit=$((1 << 20))
allowed=()
while read -r path _; do
	[[ -z $path || $path == \#* ]] || allowed+=("$path")
done < hack/large-files.txt

bad=0
while IFS= read -r -d '' entry; do
	mode=${entry%% *}
	path=${entry#*$'\t'}
	[[ -f $path ]] || continue
	magic=$(head -c 4 "$path" | od -An -c | tr -d ' ')
	if [[ $magic == '177ELF' ]]; then
		echo "$path: a compiled executable is tracked (build outputs go to bin/, which .gitignore covers)"
		bad=1
	elif [[ $mode == 100755 && $(head -c 2 "$path") != '#!' ]]; then
		echo "$path: executable bit on a file that is not a script"
		bad=1
	fi
	size=$(stat -c %s "$path")
	if ((size > limit)); then
		listed=0
		for a in "${allowed[@]}"; do [[ $a == "$path" ]] && listed=1; done
		if ((!listed)); then
			echo "$path: $size bytes; files over 1 MB must be listed, with what they are, in hack/large-files.txt"
			bad=1
		fi
	fi
done < <(git ls-files -s -z | sed -z 's/^\([0-9]*\) [0-9a-f]* [0-9]*\t/\1 \t/')
exit $bad
