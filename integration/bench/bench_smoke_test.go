package bench_test

import (
	"context"
	"encoding/csv"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/integration/bench"
	"github.com/starlight-project/starlight/integration/harness"
)

// smokeWorkload is a small two-layer busybox image and its update: v2
// changes one small file in each layer, so both layer digests change while
// the large file stays identical.
func smokeWorkload(t *testing.T) bench.Workload {
	v1 := harness.LazyImage("starlight-bench-smoke/app:v1", 8<<20)
	v2 := harness.LazyImage("starlight-bench-smoke/app:v2", 8<<20)
	v2.Layers[0] = append(harness.BusyboxLayer(), harness.Entry{Name: "/small.txt", Content: []byte("small file, version 2\n")})
	v2.Layers[1] = append(v2.Layers[1], harness.Entry{Name: "/version", Content: []byte("2\n")})
	built := func(spec harness.ImageSpec) *bench.BuiltImage {
		img := harness.BuildImage(t, spec)
		return &bench.BuiltImage{App: "busybox", Name: img.Name, Archive: img.Archive, Layers: img.DiffIDs}
	}
	check := []string{"cat", "/small.txt"}
	return bench.Workload{Name: "busybox", V1: built(v1), V2: built(v2), Check: check}
}

// TestBenchSmoke runs the whole benchmark harness on one small image, one
// profile (WAN) and one repetition, and checks that it produces its files
// with a row per system. It asserts no timing: `make bench` measures.
func TestBenchSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end benchmark smoke test; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING the benchmark smoke test: it needs root (containerd, runc, overlayfs, FUSE)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("SKIPPING the benchmark smoke test: no /dev/fuse (%v)", err)
	}
	wan, ok := bench.ProfileByName("WAN")
	if !ok {
		t.Fatal("no WAN profile")
	}
	// The eStargz systems need stargz-snapshotter's binaries, which
	// hack/bench.sh builds for `make bench` (make test does not build
	// them): only that part is skipped without them.
	stargzBin := os.Getenv("STARGZ_BIN")
	var systems []string
	withStargz := stargzBin != ""
	for _, b := range []string{harness.StargzBinary, harness.CtrRemoteBinary} {
		if _, err := os.Stat(filepath.Join(stargzBin, b)); err != nil {
			withStargz = false
		}
	}
	for _, s := range bench.AllSystems() {
		if withStargz || (s != bench.SysEstargz && s != bench.SysEstargzOpt) {
			systems = append(systems, s)
		}
	}
	if !withStargz {
		t.Logf("SKIPPING the estargz and estargz-opt part of the smoke test: no %s and %s in $STARGZ_BIN (%q); "+
			"hack/bench.sh builds them", harness.StargzBinary, harness.CtrRemoteBinary, stargzBin)
	}
	res, err := bench.Run(context.Background(), bench.Options{
		Workloads: []bench.Workload{smokeWorkload(t)},
		Profiles:  []bench.Profile{wan},
		Runs:      1,
		Systems:   systems,
		StargzBin: stargzBin,
		Logf:      t.Logf,
	})
	if err != nil {
		t.Fatalf("bench: %v", err)
	}
	res.Machine = bench.Machine()
	dir := t.TempDir()
	if err := res.WriteFiles(dir); err != nil {
		t.Fatalf("writing results: %v", err)
	}
	for _, n := range res.Notes {
		t.Logf("NOTE: %s", n)
	}
	for _, s := range res.Samples {
		if s.Err != "" {
			t.Errorf("%s %s %s failed: %s", s.Image, s.Profile, s.System, s.Err)
		}
	}
	for _, l := range res.FailureLogs {
		t.Log(l)
	}

	for _, name := range []string{"results.md", "results.csv", "samples.csv", "plot.svg", "machine.txt"} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Size() == 0 {
			t.Errorf("%s missing or empty (%v)", name, err)
		}
	}
	f, err := os.Open(filepath.Join(dir, "results.csv"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatalf("results.csv: %v", err)
	}
	if len(recs) < 2 || strings.Join(recs[0][:4], ",") != "image,profile,system,seconds" {
		t.Fatalf("results.csv: unexpected header or no rows: %v", recs)
	}
	got := map[string]string{}
	for _, r := range recs[1:] {
		if r[0] != "busybox" || r[1] != "WAN" {
			t.Errorf("unexpected row %v", r)
		}
		got[r[2]] = r[3]
	}
	want := []string{bench.SysContainerd, bench.SysStarlight, bench.SysContainerdUpdate, bench.SysStarlightUpdate}
	if withStargz {
		want = append(want, bench.SysEstargz, bench.SysEstargzOpt)
	}
	if _, traced := res.Limits["busybox"]; traced && res.Limits["busybox"].Accesses > 0 {
		want = append(want, bench.SysStarlightTrace, bench.SysLimit, bench.SysLimitUpdate)
	} else {
		// Tracing belongs to the worker; without it the harness must
		// still produce every other row, and say why these are missing.
		t.Logf("WARNING: no trace rows: %v", res.Notes)
		if len(res.Notes) == 0 {
			t.Errorf("trace rows are missing without a note saying why")
		}
	}
	for _, sys := range want {
		v, ok := got[sys]
		if !ok {
			t.Errorf("results.csv has no %s row (rows: %v)", sys, got)
			continue
		}
		if v == "" {
			t.Errorf("results.csv: %s has no time", sys)
		}
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	for _, sys := range want {
		if !strings.Contains(string(md), sys) {
			t.Errorf("results.md does not mention %s", sys)
		}
	}
}
