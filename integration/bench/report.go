package bench

import (
	"encoding/csv"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Row is one cell of the results: the median of a system's runs on one
// image and profile.
type Row struct {
	Image, Profile, System string
	Seconds                float64 // median; NaN when no run succeeded
	Runs, Failed           int
	// Speedup is plain containerd's time over this one (>1: faster);
	// XLimit is this time over the limit (>=1). Zero when unknown.
	Speedup, XLimit float64
	// Medians of the diagnostics (see Sample).
	Pull, Start, WorkerReady   float64
	LinkBytes, ReceivedAtReady int64
	DemandBytes                int64
	SendBytes                  int64
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func medianInt(xs []int64) int64 {
	f := make([]float64, len(xs))
	for i, x := range xs {
		f[i] = float64(x)
	}
	m := median(f)
	if math.IsNaN(m) {
		return 0
	}
	return int64(m)
}

// Images returns the workload names in the order they were measured.
func (r *Result) Images() []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range r.Samples {
		if !seen[s.Image] {
			seen[s.Image] = true
			out = append(out, s.Image)
		}
	}
	return out
}

// Rows aggregates the samples and adds the limits, in image, profile,
// system order.
func (r *Result) Rows() []Row {
	type key struct{ img, prof, sys string }
	groups := map[key][]Sample{}
	for _, s := range r.Samples {
		k := key{s.Image, s.Profile, s.System}
		groups[k] = append(groups[k], s)
	}
	// Local start: the readiness check on a complete local image, from
	// every plain containerd cold run of the image (any profile).
	local := map[string][]float64{}
	for _, s := range r.Samples {
		if s.System == SysContainerd && s.Err == "" {
			local[s.Image] = append(local[s.Image], s.Local)
		}
	}
	var rows []Row
	for _, img := range r.Images() {
		for _, p := range r.Profiles {
			cell := map[string]*Row{}
			var order []string
			for _, sys := range r.systems() {
				row := &Row{Image: img, Profile: p.Name, System: sys, Seconds: math.NaN()}
				switch sys {
				case SysLimit, SysLimitUpdate:
					lim, ok := r.Limits[img]
					if !ok || lim.Accesses == 0 || len(local[img]) == 0 {
						continue
					}
					if sys == SysLimitUpdate && !r.hasSystem(img, SysStarlightUpdate) {
						continue
					}
					lim.LocalStart = median(local[img])
					row.Seconds = lim.Seconds(p, sys == SysLimitUpdate)
					row.Runs = 1
				default:
					ss := groups[key{img, p.Name, sys}]
					if len(ss) == 0 {
						continue
					}
					var secs, pull, start, ready []float64
					var link, recv, send, demand []int64
					for _, s := range ss {
						if s.Err != "" {
							row.Failed++
							continue
						}
						secs = append(secs, s.Seconds)
						pull = append(pull, s.Pull)
						start = append(start, s.Start)
						ready = append(ready, s.WorkerReady)
						link = append(link, s.LinkBytes)
						recv = append(recv, s.ReceivedAtReady)
						send = append(send, s.SendBytes)
						demand = append(demand, s.DemandBytes)
					}
					row.Runs = len(secs)
					row.Seconds, row.Pull, row.Start, row.WorkerReady = median(secs), median(pull), median(start), median(ready)
					row.LinkBytes, row.ReceivedAtReady, row.SendBytes = medianInt(link), medianInt(recv), medianInt(send)
					row.DemandBytes = medianInt(demand)
				}
				cell[sys] = row
				order = append(order, sys)
			}
			for _, sys := range order {
				row := cell[sys]
				if b := cell[Baseline(sys)]; b != nil && row.Seconds > 0 && !math.IsNaN(b.Seconds) {
					row.Speedup = b.Seconds / row.Seconds
				}
				if l := cell[LimitOf(sys)]; l != nil && l.Seconds > 0 && !math.IsNaN(row.Seconds) {
					row.XLimit = row.Seconds / l.Seconds
				}
				rows = append(rows, *row)
			}
		}
	}
	return rows
}

func (r *Result) hasSystem(img, sys string) bool {
	for _, s := range r.Samples {
		if s.Image == img && s.System == sys {
			return true
		}
	}
	return false
}

// WriteFiles writes results.csv, samples.csv, results.md, plot.svg,
// machine.txt and, if a measurement failed, failures.log into dir.
func (r *Result) WriteFiles(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rows := r.Rows()
	for name, fn := range map[string]func(io.Writer) error{
		"results.csv": func(w io.Writer) error { return writeRowsCSV(w, rows) },
		"samples.csv": r.writeSamplesCSV,
		"results.md":  func(w io.Writer) error { return r.writeMarkdown(w, rows) },
		"plot.svg":    func(w io.Writer) error { return r.writeSVG(w, rows) },
		"machine.txt": func(w io.Writer) error { _, err := io.WriteString(w, r.Machine); return err },
		"failures.log": func(w io.Writer) error {
			_, err := io.WriteString(w, strings.Join(r.FailureLogs, "\n"))
			return err
		},
	} {
		if name == "failures.log" && len(r.FailureLogs) == 0 {
			continue
		}
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			return err
		}
		if err := fn(f); err != nil {
			f.Close()
			return fmt.Errorf("%s: %w", name, err)
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	return nil
}

func ff(x float64, prec int) string {
	if math.IsNaN(x) || x == 0 {
		return ""
	}
	return strconv.FormatFloat(x, 'f', prec, 64)
}

func writeRowsCSV(w io.Writer, rows []Row) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"image", "profile", "system", "seconds", "runs", "failed",
		"speedup_vs_containerd", "ratio_to_limit", "pull_seconds", "start_seconds", "link_mib"})
	for _, r := range rows {
		_ = cw.Write([]string{r.Image, r.Profile, r.System, ff(r.Seconds, 3), strconv.Itoa(r.Runs), strconv.Itoa(r.Failed),
			ff(r.Speedup, 2), ff(r.XLimit, 2), ff(r.Pull, 3), ff(r.Start, 3), ff(float64(r.LinkBytes)/(1<<20), 2)})
	}
	cw.Flush()
	return cw.Error()
}

func (r *Result) writeSamplesCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"image", "profile", "system", "run", "seconds", "pull_seconds", "start_seconds",
		"local_start_seconds", "link_bytes", "send_bytes", "dedup_bytes", "received_at_ready", "worker_ready_seconds", "error", "demand_bytes"})
	for _, s := range r.Samples {
		_ = cw.Write([]string{s.Image, s.Profile, s.System, strconv.Itoa(s.Run), ff(s.Seconds, 3), ff(s.Pull, 3), ff(s.Start, 3), ff(s.Local, 3),
			strconv.FormatInt(s.LinkBytes, 10), strconv.FormatInt(s.SendBytes, 10), strconv.FormatInt(s.DedupBytes, 10),
			strconv.FormatInt(s.ReceivedAtReady, 10), ff(s.WorkerReady, 3), firstLine(errString(s.Err)), strconv.FormatInt(s.DemandBytes, 10)})
	}
	cw.Flush()
	return cw.Error()
}

// geomean of the positive values; NaN when none.
func geomean(xs []float64) float64 {
	var sum float64
	n := 0
	for _, x := range xs {
		if x > 0 && !math.IsNaN(x) {
			sum += math.Log(x)
			n++
		}
	}
	if n == 0 {
		return math.NaN()
	}
	return math.Exp(sum / float64(n))
}

// Target is one of the bars with the measured value.
type Target struct {
	What     string
	Value    float64
	Bar      string
	Met      bool
	Measured bool
}

// Targets evaluates the benchmark's targets on rows.
func Targets(rows []Row) []Target {
	pick := func(sys string, profiles ...string) (speed, xlim []float64) {
		for _, r := range rows {
			if r.System != sys {
				continue
			}
			for _, p := range profiles {
				if strings.EqualFold(r.Profile, p) {
					speed = append(speed, r.Speedup)
					xlim = append(xlim, r.XLimit)
				}
			}
		}
		return speed, xlim
	}
	var out []Target
	add := func(what, bar string, v float64, met func(float64) bool) {
		out = append(out, Target{What: what, Value: v, Bar: bar, Measured: !math.IsNaN(v), Met: !math.IsNaN(v) && met(v)})
	}
	for _, sys := range []string{SysStarlight, SysStarlightTrace} {
		s, l := pick(sys, "WAN", "edge")
		add(fmt.Sprintf("cold start (%s), WAN+edge geomean speedup vs containerd", sys), "≥ 5×", geomean(s), func(v float64) bool { return v >= 5 })
		add(fmt.Sprintf("cold start (%s), WAN+edge geomean time / limit", sys), "≤ 1.5×", geomean(l), func(v float64) bool { return v <= 1.5 })
	}
	s, l := pick(SysStarlightUpdate, "WAN", "edge")
	add("update, WAN+edge geomean speedup vs containerd update", "≥ 6×", geomean(s), func(v float64) bool { return v >= 6 })
	add("update, WAN+edge geomean time / update limit", "≤ 1.5×", geomean(l), func(v float64) bool { return v <= 1.5 })
	for _, sys := range []string{SysStarlight, SysStarlightTrace, SysStarlightUpdate} {
		s, _ := pick(sys, "LAN")
		worst := math.NaN()
		for _, v := range s {
			if v > 0 && (math.IsNaN(worst) || v < worst) {
				worst = v
			}
		}
		add(fmt.Sprintf("LAN, %s: worst speedup vs containerd", sys), "≥ 1× (never slower)", worst, func(v float64) bool { return v >= 1 })
	}
	// Against the peer: the worst ratio over every image and link where
	// both were measured.
	for _, pair := range [][2]string{{SysStarlightTrace, SysEstargzOpt}, {SysStarlight, SysEstargz}} {
		add(fmt.Sprintf("%s vs %s (speedup, every image): worst over every image and link", pair[0], pair[1]),
			"> 1× (faster on every image)", worstRatio(rows, pair[0], pair[1]), func(v float64) bool { return v > 1 })
	}
	return out
}

// worstRatio is the smallest time(peer) / time(sys) over the image ×
// profile cells where both succeeded; NaN when there is none.
func worstRatio(rows []Row, sys, peer string) float64 {
	type cell struct{ img, prof string }
	peers := map[cell]float64{}
	for _, r := range rows {
		if r.System == peer && r.Seconds > 0 {
			peers[cell{r.Image, r.Profile}] = r.Seconds
		}
	}
	worst := math.NaN()
	for _, r := range rows {
		p, ok := peers[cell{r.Image, r.Profile}]
		if r.System != sys || !ok || !(r.Seconds > 0) {
			continue
		}
		if v := p / r.Seconds; math.IsNaN(worst) || v < worst {
			worst = v
		}
	}
	return worst
}

func (r *Result) writeMarkdown(w io.Writer, rows []Row) error {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("# Starlight provisioning benchmark, %s\n\n", r.Started.UTC().Format("2006-01-02 15:04 MST"))
	p("Time from \"provision this image\" to \"the readiness check exited 0\", median of %d runs per cell, "+
		"every run on a fresh containerd (and worker or stargz snapshotter). Run took %s.\n\n", r.Runs, r.Finished.Sub(r.Started).Round(time.Second))
	p("Links (userspace emulator `integration/linkem`, bandwidth shared by all connections):")
	for _, pr := range r.Profiles {
		p(" %s = %s;", pr.Name, pr.Profile)
	}
	p("\n\n![plot](plot.svg)\n\n## Targets\n\n| target | measured | bar | met |\n|---|---|---|---|\n")
	for _, t := range Targets(rows) {
		v, met := "n/a", "n/a"
		if t.Measured {
			v = fmt.Sprintf("%.2f×", t.Value)
			met = map[bool]string{true: "yes", false: "**no**"}[t.Met]
		}
		p("| %s | %s | %s | %s |\n", t.What, v, t.Bar, met)
	}
	systems := r.systems()
	for _, pr := range r.Profiles {
		p("\n## %s (%s)\n\nSeconds; in parentheses the speedup over plain containerd (cold or update) and the ratio to the limit.\n\n| image |", pr.Name, pr.Profile)
		for _, s := range systems {
			p(" %s |", s)
		}
		p("\n|---|")
		for range systems {
			p("---:|")
		}
		p("\n")
		for _, img := range r.Images() {
			p("| %s |", img)
			for _, s := range systems {
				cellText := ""
				for _, row := range rows {
					if row.Image == img && row.Profile == pr.Name && row.System == s {
						cellText = fmtCell(row)
					}
				}
				p(" %s |", cellText)
			}
			p("\n")
		}
	}
	p("\n## Limits\n\nThe physical limit is one RTT + startup bytes / bandwidth + the readiness check's time on a complete local image " +
		"(overlayfs: median of a second `ctr run` of the check after each plain containerd cold run). Startup bytes are the compressed sizes of the chunks the traced run read " +
		"(each content once); for updates only those of files whose content v1 lacks, v1's startup paths matched in v2. " +
		"\"whole files\" counts every opened file whole, what a file-granular bundle would have to move.\n\n")
	p("| image | image MiB | startup chunks MiB | startup whole files MiB | update MiB (v2 not in v1) | update startup MiB | update startup whole files MiB | trace accesses | files | local start s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, img := range r.Images() {
		l, ok := r.Limits[img]
		if !ok {
			continue
		}
		p("| %s | %.1f | %.2f | %.2f | %.1f | %.2f | %.2f | %d | %d | %s |\n", img, mibf(l.ImageBytes), mibf(l.StartupBytes), mibf(l.StartupFileBytes),
			mibf(l.UpdateImageBytes), mibf(l.UpdateBytes), mibf(l.UpdateFileBytes), l.Accesses, l.Files, ff(r.localStart(img), 3))
	}
	p("\n## Where the time goes (Starlight rows)\n\npull = `ctr-starlight pull` until the image is usable; start = the readiness check's `ctr run` " +
		"(blocks on contents that have not arrived); ready = the worker's own ready time after the pull started; " +
		"received = bundle bytes the worker had when the check exited; on demand = bytes fetched by ranged blob GETs for reads that " +
		"had to wait, by then; link = bytes that crossed the link towards the worker.\n\n")
	p("| image | profile | system | total s | pull s | worker ready s | start s | received MiB | on demand MiB | bundle MiB | link MiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, row := range rows {
		if !strings.HasPrefix(row.System, "starlight") {
			continue
		}
		p("| %s | %s | %s | %s | %s | %s | %s | %.1f | %.1f | %.1f | %.1f |\n", row.Image, row.Profile, row.System, ff(row.Seconds, 2), ff(row.Pull, 2),
			ff(row.WorkerReady, 2), ff(row.Start, 2), mibf(row.ReceivedAtReady), mibf(row.DemandBytes), mibf(row.SendBytes), mibf(row.LinkBytes))
	}
	if r.hasEstargz(rows) {
		p("\n## Where the time goes (eStargz rows)\n\npull = `ctr-remote image rpull` (returns once the layers are mounted lazily); " +
			"start = the readiness check's `ctr run --snapshotter stargz` (blocks on contents not fetched yet); link = bytes that crossed the link by then.\n\n")
		p("| image | profile | system | total s | pull s | start s | link MiB |\n|---|---|---|---:|---:|---:|---:|\n")
		for _, row := range rows {
			if !isEstargz(row.System) {
				continue
			}
			p("| %s | %s | %s | %s | %s | %s | %.1f |\n", row.Image, row.Profile, row.System, ff(row.Seconds, 2), ff(row.Pull, 2), ff(row.Start, 2), mibf(row.LinkBytes))
		}
	}
	if len(r.Notes) > 0 {
		p("\n## Notes\n\n")
		for _, n := range r.Notes {
			p("* %s\n", n)
		}
	}
	failed := 0
	for _, s := range r.Samples {
		if s.Err != "" {
			failed++
		}
	}
	if failed > 0 {
		p("\n## Failed runs (%d)\n\n", failed)
		for _, s := range r.Samples {
			if s.Err != "" {
				p("* %s %s %s run %d: `%s`\n", s.Image, s.Profile, s.System, s.Run, strings.ReplaceAll(firstLine(errString(s.Err)), "`", "'"))
			}
		}
	}
	p("\n## Machine\n\n```\n%s```\n", r.Machine)
	return nil
}

func (r *Result) hasEstargz(rows []Row) bool {
	for _, row := range rows {
		if isEstargz(row.System) {
			return true
		}
	}
	return false
}

func (r *Result) localStart(img string) float64 {
	var xs []float64
	for _, s := range r.Samples {
		if s.Image == img && s.System == SysContainerd && s.Err == "" {
			xs = append(xs, s.Local)
		}
	}
	return median(xs)
}

func mibf(b int64) float64 { return float64(b) / (1 << 20) }

func fmtCell(r Row) string {
	if math.IsNaN(r.Seconds) {
		if r.Failed > 0 {
			return fmt.Sprintf("failed (%d)", r.Failed)
		}
		return ""
	}
	s := fmt.Sprintf("%.2f", r.Seconds)
	var extra []string
	if r.Speedup > 0 && r.System != SysContainerd && r.System != SysContainerdUpdate {
		extra = append(extra, fmt.Sprintf("%.1f×", r.Speedup))
	}
	if r.XLimit > 0 && r.System != SysLimit && r.System != SysLimitUpdate {
		extra = append(extra, fmt.Sprintf("%.1f×lim", r.XLimit))
	}
	if len(extra) > 0 {
		s += " (" + strings.Join(extra, ", ") + ")"
	}
	if r.Failed > 0 {
		s += fmt.Sprintf(" [%d failed]", r.Failed)
	}
	return s
}

// ReadRowsCSV reads a results.csv written by WriteFiles.
func ReadRowsCSV(rd io.Reader) ([]Row, error) {
	recs, err := csv.NewReader(rd).ReadAll()
	if err != nil {
		return nil, err
	}
	if len(recs) == 0 || len(recs[0]) < 11 || recs[0][0] != "image" {
		return nil, fmt.Errorf("not a results.csv")
	}
	num := func(s string) float64 {
		if s == "" {
			return math.NaN()
		}
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return math.NaN()
		}
		return v
	}
	var rows []Row
	for _, rec := range recs[1:] {
		runs, _ := strconv.Atoi(rec[4])
		failed, _ := strconv.Atoi(rec[5])
		rows = append(rows, Row{Image: rec[0], Profile: rec[1], System: rec[2], Seconds: num(rec[3]), Runs: runs, Failed: failed,
			Speedup: num(rec[6]), XLimit: num(rec[7]), Pull: num(rec[8]), Start: num(rec[9])})
	}
	return rows, nil
}

// Replot redraws dir/plot.svg from dir/results.csv; the date is taken
// from the name of dir (results/<date>), the number of runs from the rows.
func Replot(dir string) error {
	f, err := os.Open(filepath.Join(dir, "results.csv"))
	if err != nil {
		return err
	}
	defer f.Close()
	rows, err := ReadRowsCSV(f)
	if err != nil {
		return fmt.Errorf("%s: %w", f.Name(), err)
	}
	res := &Result{}
	seenImg, seenProf, seenSys := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, row := range rows {
		seenSys[row.System] = true
		if !seenImg[row.Image] {
			seenImg[row.Image] = true
			// Images() orders by samples: one per image suffices.
			res.Samples = append(res.Samples, Sample{Image: row.Image})
		}
		if !seenProf[row.Profile] {
			seenProf[row.Profile] = true
			if p, ok := ProfileByName(row.Profile); ok {
				res.Profiles = append(res.Profiles, p)
			}
		}
		if row.Runs > res.Runs && row.System != SysLimit && row.System != SysLimitUpdate {
			res.Runs = row.Runs
		}
	}
	for _, sys := range AllSystems() {
		if seenSys[sys] {
			res.Systems = append(res.Systems, sys)
		}
	}
	if t, err := time.Parse("2006-01-02", strings.SplitN(filepath.Base(dir), ".", 2)[0]); err == nil {
		res.Started = t
	}
	out, err := os.Create(filepath.Join(dir, "plot.svg"))
	if err != nil {
		return err
	}
	if err := res.writeSVG(out, rows); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
