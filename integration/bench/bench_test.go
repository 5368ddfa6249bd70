package bench

import (
	"archive/tar"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/linkem"
)

func TestMedianGeomean(t *testing.T) {
	for _, tc := range []struct {
		xs     []float64
		median float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := median(tc.xs); got != tc.median {
			t.Errorf("median(%v) = %v, want %v", tc.xs, got, tc.median)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is not NaN")
	}
	if got := geomean([]float64{2, 8, math.NaN(), 0}); math.Abs(got-4) > 1e-9 {
		t.Errorf("geomean = %v, want 4 (NaN and 0 ignored)", got)
	}
}

func TestLimitSeconds(t *testing.T) {
	p := Profile{Name: "WAN", Profile: linkem.Profile{RTT: 50 * time.Millisecond, Bandwidth: 100_000_000}}
	l := Limit{StartupBytes: 12_500_000, UpdateBytes: 1_250_000, LocalStart: 0.5}
	if got := l.Seconds(p, false); math.Abs(got-1.55) > 1e-9 {
		t.Errorf("cold limit = %v, want 0.05 + 1 + 0.5", got)
	}
	if got := l.Seconds(p, true); math.Abs(got-0.65) > 1e-9 {
		t.Errorf("update limit = %v, want 0.05 + 0.1 + 0.5", got)
	}
}

// TestStartupBytes: chunk-level accesses count their chunks, a file open
// counts its first chunk, each content once; the update counts only the
// files whose content v1 lacks, found by path in v2.
func TestStartupBytes(t *testing.T) {
	big := func(d string, sizes ...int64) api.Entry {
		e := api.Entry{Name: "usr/lib/big", Type: api.TypeReg, Digest: d}
		var off int64
		for _, s := range sizes {
			e.Chunks = append(e.Chunks, api.Chunk{Offset: off, Size: 1 << 20, CompressedSize: s})
			off += 1 << 20
		}
		e.Size = off
		return e
	}
	small := func(name, d string, cs int64) api.Entry {
		return api.Entry{Name: name, Type: api.TypeReg, Size: 10, Digest: d, Chunks: []api.Chunk{{Size: 10, CompressedSize: cs}}}
	}
	h1 := &api.BundleHeader{Layers: []api.LayerTree{
		{Digest: "L1", Entries: []api.Entry{small("bin/sh", "d-sh", 100), small("etc/conf", "d-conf", 10), small("etc/copy", "d-conf", 10)}},
		{Digest: "L2", Entries: []api.Entry{big("d-big", 1000, 2000, 3000)}},
	}}
	rep := &api.TraceReport{Accesses: []api.TraceAccess{
		{Layer: "L1", Name: "bin/sh"},
		{Layer: "L1", Name: "etc/conf"},
		{Layer: "L1", Name: "etc/copy"}, // same content: counted once
		{Layer: "L2", Name: "usr/lib/big"},
		{Layer: "L2", Name: "usr/lib/big", ChunkOffset: 2 << 20},
		{Layer: "L2", Name: "usr/lib/big", ChunkOffset: 2 << 20},
	}}
	t1 := newTreeIndex(h1)
	s := startupSet(t1, rep)
	chunks, files := s.bytes(t1, nil)
	if chunks != 100+10+1000+3000 || files != 100+10+6000 {
		t.Errorf("cold: chunks %d files %d, want %d and %d", chunks, files, 4110, 6110)
	}
	// v2: sh unchanged, conf changed, big rebuilt.
	h2 := &api.BundleHeader{Layers: []api.LayerTree{
		{Digest: "M1", Entries: []api.Entry{small("bin/sh", "d-sh", 100), small("etc/conf", "d-conf2", 12), small("etc/copy", "d-conf", 10)}},
		{Digest: "M2", Entries: []api.Entry{big("d-big2", 1100, 2100, 3100)}},
	}}
	chunks, files = s.bytes(newTreeIndex(h2), t1.contents)
	if chunks != 12+1100+3100 || files != 12+6300 {
		t.Errorf("update: chunks %d files %d, want %d and %d", chunks, files, 4212, 6312)
	}
}

func TestRowsAndTargets(t *testing.T) {
	wan := Profile{Name: "WAN", Profile: linkem.Profile{RTT: 50 * time.Millisecond, Bandwidth: 100_000_000}}
	res := &Result{Profiles: []Profile{wan}, Runs: 3, Limits: map[string]Limit{
		"app": {Accesses: 10, StartupBytes: 12_500_000, UpdateBytes: 1_250_000},
	}}
	add := func(sys string, secs ...float64) {
		for i, s := range secs {
			res.Samples = append(res.Samples, Sample{Image: "app", Profile: "WAN", System: sys, Run: i + 1, Seconds: s, Local: 0.45})
		}
	}
	add(SysContainerd, 10, 12, 11)
	add(SysStarlight, 5, 6, 100)
	add(SysContainerdUpdate, 12)
	add(SysStarlightUpdate, 2)
	add(SysEstargz, 9, 7, 8)
	add(SysEstargzOpt, 4)
	res.Samples = append(res.Samples, Sample{Image: "app", Profile: "WAN", System: SysStarlightTrace, Run: 1, Err: "boom"})
	rows := res.Rows()
	got := map[string]Row{}
	for _, r := range rows {
		got[r.System] = r
	}
	if r := got[SysStarlight]; r.Seconds != 6 || math.Abs(r.Speedup-11.0/6) > 1e-9 || math.Abs(r.XLimit-6/1.5) > 1e-9 {
		t.Errorf("starlight row = %+v", r)
	}
	if r := got[SysStarlightTrace]; !math.IsNaN(r.Seconds) || r.Failed != 1 {
		t.Errorf("failed row = %+v", r)
	}
	if r := got[SysLimitUpdate]; math.Abs(r.Seconds-0.6) > 1e-9 {
		t.Errorf("update limit row = %+v", r)
	}
	if r := got[SysStarlightUpdate]; math.Abs(r.Speedup-6) > 1e-9 {
		t.Errorf("update row = %+v", r)
	}
	if r := got[SysEstargz]; r.Seconds != 8 || math.Abs(r.Speedup-11.0/8) > 1e-9 || math.Abs(r.XLimit-8/1.5) > 1e-9 {
		t.Errorf("estargz row = %+v", r)
	}
	var met []string
	for _, tg := range Targets(rows) {
		switch {
		case strings.HasPrefix(tg.What, "starlight vs estargz"):
			if !tg.Measured || math.Abs(tg.Value-8.0/6) > 1e-9 || !tg.Met {
				t.Errorf("starlight vs estargz target = %+v, want 8/6, met", tg)
			}
		case strings.HasPrefix(tg.What, "starlight+trace vs estargz-opt"):
			if tg.Measured {
				t.Errorf("starlight+trace vs estargz-opt measured without a starlight+trace time: %+v", tg)
			}
		}
	}
	for _, tg := range Targets(rows) {
		if tg.Met {
			met = append(met, tg.What)
		}
	}
	if len(met) != 2 || !strings.HasPrefix(met[0], "update, WAN+edge geomean speedup") || !strings.HasPrefix(met[1], "starlight vs estargz") {
		t.Errorf("targets met = %v, want the update speedup and starlight vs estargz", met)
	}
	dir := t.TempDir()
	if err := res.WriteFiles(dir); err != nil {
		t.Fatal(err)
	}
	svg, _ := os.ReadFile(filepath.Join(dir, "plot.svg"))
	if !strings.Contains(string(svg), "<svg") || !strings.Contains(string(svg), "app WAN starlight: 6.00s") {
		t.Errorf("plot.svg lacks the starlight bar:\n%s", svg)
	}
	if !strings.Contains(string(svg), "app WAN estargz: 8.00s") || !strings.Contains(string(svg), ">estargz-opt</text>") {
		t.Errorf("plot.svg lacks the estargz bar or the estargz-opt legend")
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	if !strings.Contains(string(md), " estargz-opt |") || !strings.Contains(string(md), "Where the time goes (eStargz rows)") {
		t.Errorf("results.md lacks the estargz-opt column or the eStargz section")
	}

	// A run restricted with -systems has only those rows.
	res.Systems = []string{SysContainerd, SysEstargz}
	for _, r := range res.Rows() {
		if r.System != SysContainerd && r.System != SysEstargz {
			t.Errorf("restricted run has a %s row", r.System)
		}
	}
}

func TestSelectSystems(t *testing.T) {
	got, err := SelectSystems([]string{SysStarlightTrace, SysEstargzOpt, SysContainerd})
	if err != nil || strings.Join(got, ",") != "containerd,estargz-opt,starlight+trace" {
		t.Errorf("SelectSystems = %v, %v; want result order", got, err)
	}
	if all, _ := SelectSystems(nil); len(all) != len(ColdSystems)+len(UpdateSystems) {
		t.Errorf("SelectSystems(nil) = %v, want all", all)
	}
	if _, err := SelectSystems([]string{"stargz"}); err == nil {
		t.Error("unknown system accepted")
	}
}

// TestWriteLayerTarOverlay: an overlayfs upper directory becomes an OCI
// layer: whiteout devices become .wh. files, opaque directories get
// .wh..wh..opq, hard links stay links.
func TestWriteLayerTarOverlay(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (whiteout device, trusted.* xattr)")
	}
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "etc/opq"), 0o755))
	must(os.WriteFile(filepath.Join(root, "etc/a"), []byte("a"), 0o644))
	must(os.Link(filepath.Join(root, "etc/a"), filepath.Join(root, "etc/b")))
	must(unix.Mknod(filepath.Join(root, "etc/gone"), unix.S_IFCHR, 0))
	must(unix.Setxattr(filepath.Join(root, "etc/opq"), "trusted.overlay.opaque", []byte("y"), 0))
	out := filepath.Join(t.TempDir(), "layer.tar")
	diffID, err := writeLayerTar(root, out, true)
	must(err)
	if !strings.HasPrefix(diffID, "sha256:") {
		t.Errorf("diff ID %q", diffID)
	}
	f, err := os.Open(out)
	must(err)
	defer f.Close()
	var names []string
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		must(err)
		n := h.Name
		if h.Typeflag == tar.TypeLink {
			n += " -> " + h.Linkname
		}
		names = append(names, n)
	}
	sort.Strings(names)
	want := []string{"etc/", "etc/.wh.gone", "etc/a", "etc/b -> etc/a", "etc/opq/", "etc/opq/.wh..wh..opq"}
	if strings.Join(names, "|") != strings.Join(want, "|") {
		t.Errorf("layer entries = %q, want %q", names, want)
	}
}
