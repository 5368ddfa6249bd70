package registryext

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/schema"
)

// run builds a trace run from "name" or "name@offset" items in access
// order, one millisecond apart, all in layer L0 unless prefixed "L1:".
func run(id string, items ...string) schema.TraceRun {
	r := schema.TraceRun{ID: id}
	for i, it := range items {
		layer := "L0"
		if l, rest, ok := strings.Cut(it, ":"); ok {
			layer, it = l, rest
		}
		var off int64
		if n, o, ok := strings.Cut(it, "@"); ok {
			it = n
			fmt.Sscan(o, &off)
		}
		r.Entries = append(r.Entries, schema.TraceEntry{Layer: layer, Name: it, Digest: "sha256:" + it,
			ChunkOffset: off, TimeNS: int64(i+1) * int64(time.Millisecond)})
	}
	return r
}

func names(items []schema.PriorityItem) []string {
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = it.Name
		if it.ChunkOffset != 0 {
			out[i] += fmt.Sprintf("@%d", it.ChunkOffset)
		}
		if it.Layer != "L0" {
			out[i] = it.Layer + ":" + out[i]
		}
	}
	return out
}

func TestMergeTraces(t *testing.T) {
	layers := []string{"L0", "L1"}
	for _, tc := range []struct {
		name string
		runs []schema.TraceRun
		want []string
	}{
		{
			name: "one run keeps its order",
			runs: []schema.TraceRun{run("a", "sh", "libc", "conf")},
			want: []string{"sh", "libc", "conf"},
		},
		{
			name: "items every run saw early come first",
			runs: []schema.TraceRun{
				run("a", "sh", "libc", "app", "data", "log"),
				run("b", "libc", "sh", "app", "log", "data"),
				run("c", "sh", "app", "libc", "data", "log"),
			},
			// sh: 0,1,0 → 0; libc: 1,0,2 → 1; app: 2,2,1 → 2; data: 3,4,3 → 3; log: 4,3,4 → 4
			want: []string{"sh", "libc", "app", "data", "log"},
		},
		{
			name: "an item only one run saw lands by its rank",
			runs: []schema.TraceRun{
				run("a", "sh", "libc", "app", "data"),
				run("b", "sh", "plugin", "libc", "app", "data"),
				run("c", "sh", "libc", "app", "data"),
			},
			// plugin: 1 (one run); libc: 1,2,1 → 1, seen by more runs, first.
			// app: 2,3,2 → 2; data: 3,4,3 → 3.
			want: []string{"sh", "libc", "plugin", "app", "data"},
		},
		{
			name: "a late item of one run stays late",
			runs: []schema.TraceRun{
				run("a", "sh", "libc", "app"),
				run("b", "sh", "libc", "app", "x1", "x2", "x3", "rare"),
				run("c", "sh", "app", "libc"),
			},
			want: []string{"sh", "libc", "app", "x1", "x2", "x3", "rare"},
		},
		{
			name: "an outlier run does not move a consensus item",
			runs: []schema.TraceRun{
				run("a", "sh", "libc", "app"),
				run("b", "app", "sh", "libc"),
				run("c", "sh", "libc", "app"),
			},
			// app: 2,0,2 → median 2.
			want: []string{"sh", "libc", "app"},
		},
		{
			name: "even run count uses the mean of the middle ranks",
			runs: []schema.TraceRun{
				run("a", "x", "y", "z"),
				run("b", "z", "x", "y"),
			},
			// x: 0,1 → 1; y: 1,2 → 3; z: 2,0 → 2 (halves doubled)
			want: []string{"x", "z", "y"},
		},
		{
			name: "ties go to more runs, then earlier time, then layer and name",
			runs: []schema.TraceRun{
				run("a", "L1:b", "L0:a", "c"),
				run("b", "L0:a", "L1:b", "c"),
			},
			// a and b both score 0+1, seen by two runs, same median time:
			// layer L0 first.
			want: []string{"a", "L1:b", "c"},
		},
		{
			name: "chunks are items of their own",
			runs: []schema.TraceRun{
				run("a", "java", "modules", "modules@1048576", "libjvm"),
				run("b", "java", "modules", "libjvm", "modules@1048576"),
				run("c", "java", "modules", "modules@1048576", "libjvm"),
			},
			want: []string{"java", "modules", "modules@1048576", "libjvm"},
		},
		{
			name: "the same run reported twice counts once",
			runs: []schema.TraceRun{
				withRun(run("late", "b", "a"), "w1", "c1"),
				withRun(run("partial", "b"), "w1", "c1"),
				run("other", "a", "b"),
			},
			// Without dedup b would be 0,0,1; with it: a 1,0 → 1; b 0,1 → 1;
			// tie on runs and time median: name.
			want: []string{"a", "b"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := names(mergeTraces(layers, tc.runs))
			if !slices.Equal(got, tc.want) {
				t.Errorf("got  %v\nwant %v", got, tc.want)
			}
			// The order of the runs never matters.
			rev := slices.Clone(tc.runs)
			slices.Reverse(rev)
			if again := names(mergeTraces(layers, rev)); !slices.Equal(again, got) {
				t.Errorf("reversed runs: %v, want %v", again, got)
			}
		})
	}
}

func withRun(r schema.TraceRun, worker, container string) schema.TraceRun {
	r.Worker, r.Container, r.StartedAt = worker, container, time.Unix(1_700_000_000, 0)
	return r
}

func TestMergeWholeAndRuns(t *testing.T) {
	fileLevel := run("a", "sh", "big")
	chunkLevel := run("b", "sh", "big", "big@1048576")
	noContent := run("c", "sh", "dir")
	noContent.Entries[1].Digest = ""

	items := mergeTraces(nil, []schema.TraceRun{fileLevel, chunkLevel, noContent})
	got := map[string]schema.PriorityItem{}
	for _, it := range items {
		got[names([]schema.PriorityItem{it})[0]] = it
	}
	if _, ok := got["dir"]; ok {
		t.Error("an entry without content was merged")
	}
	if it := got["sh"]; it.Runs != 3 || !it.Whole {
		t.Errorf("sh: %+v, want 3 runs, whole (a file-level run saw it)", it)
	}
	if it := got["big@1048576"]; it.Runs != 1 || it.Whole {
		t.Errorf("big@1048576: %+v, want 1 run, not whole", it)
	}
	only := mergeTraces(nil, []schema.TraceRun{chunkLevel})
	for _, it := range only {
		if it.Whole {
			t.Errorf("chunk-level run marked %s whole", it.Name)
		}
	}
}
