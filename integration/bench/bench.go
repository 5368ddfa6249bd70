// Package bench is Starlight's provisioning benchmark: it pushes images to a
// starlight-registry, puts an emulated link (package linkem) in front of it,
// and measures the time from "provision this image" to "the readiness check
// exited 0" for plain containerd and for Starlight, cold and as an update,
// next to the physical limit computed from a startup trace, and for
// stargz-snapshotter (eStargz lazy pulling, as converted and optimized by
// its ctr-remote), the peer Starlight is compared with.
//
// Every daemon is a private one started by package harness; every
// measurement gets a fresh containerd (and worker), so nothing is cached
// between runs except what the measured system is supposed to hold. Two
// registries hold the same images, one never traced and one traced, so
// that every system is measured in one interleaved loop.
package bench

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/starlight-project/starlight/integration/linkem"
)

// Profile is a named emulated link.
type Profile struct {
	Name string
	linkem.Profile
}

// Profiles are the benchmark's links.
var Profiles = []Profile{
	{Name: "LAN", Profile: linkem.Profile{RTT: 1 * time.Millisecond, Bandwidth: 1_000_000_000}},
	{Name: "WAN", Profile: linkem.Profile{RTT: 50 * time.Millisecond, Bandwidth: 100_000_000}},
	{Name: "edge", Profile: linkem.Profile{RTT: 150 * time.Millisecond, Bandwidth: 20_000_000}},
}

// ProfileByName returns the profile called name (case-insensitive).
func ProfileByName(name string) (Profile, bool) {
	for _, p := range Profiles {
		if strings.EqualFold(p.Name, name) {
			return p, true
		}
	}
	return Profile{}, false
}

// Systems, as they appear in the results.
const (
	SysContainerd       = "containerd"        // ctr pull + ctr run, overlayfs
	SysEstargz          = "estargz"           // stargz-snapshotter, ctr-remote optimize --no-optimize
	SysEstargzOpt       = "estargz-opt"       // stargz-snapshotter, ctr-remote optimize with the check
	SysStarlight        = "starlight"         // cold, no trace recorded
	SysStarlightTrace   = "starlight+trace"   // cold, after a traced run was reported
	SysLimit            = "limit"             // RTT + startup bytes / bandwidth + local start
	SysContainerdUpdate = "containerd-update" // v1 pulled, ctr pull v2 + ctr run
	SysStarlightUpdate  = "starlight-update"  // v1 complete on the worker, provision v2
	SysLimitUpdate      = "limit-update"      // as limit, counting startup bytes the worker lacks
)

// ColdSystems and UpdateSystems are the systems in result order.
var (
	ColdSystems   = []string{SysContainerd, SysEstargz, SysEstargzOpt, SysStarlight, SysStarlightTrace, SysLimit}
	UpdateSystems = []string{SysContainerdUpdate, SysStarlightUpdate, SysLimitUpdate}
)

// AllSystems are ColdSystems then UpdateSystems.
func AllSystems() []string { return append(append([]string{}, ColdSystems...), UpdateSystems...) }

func isEstargz(system string) bool { return system == SysEstargz || system == SysEstargzOpt }

// Baseline returns the plain containerd system a system is compared with.
func Baseline(system string) string {
	if isUpdate(system) {
		return SysContainerdUpdate
	}
	return SysContainerd
}

// LimitOf returns the limit a system is compared with.
func LimitOf(system string) string {
	if isUpdate(system) {
		return SysLimitUpdate
	}
	return SysLimit
}

func isUpdate(system string) bool { return strings.HasSuffix(system, "update") }

// Workload is one image of the benchmark: v1 (cold start) and optionally
// v2 (update from v1), and the readiness check.
type Workload struct {
	Name  string
	V1    *BuiltImage
	V2    *BuiltImage // nil: no update rows
	Check []string
}

// Sample is one measurement.
type Sample struct {
	Image   string
	Profile string
	System  string
	Run     int
	Seconds float64 // time to ready; 0 with Err
	// Pull and Start split Seconds: until the pull command returned, and
	// the readiness check's ctr run.
	Pull, Start float64
	// Local is, for plain containerd cold runs, a second run of the
	// check on the complete local image: the limit's start term.
	Local float64
	// LinkBytes is what crossed the link towards the worker.
	LinkBytes int64
	// For Starlight: the bundle's sent bytes, bytes received when the
	// check exited, and the worker's ready time after the pull started.
	SendBytes, DedupBytes, ReceivedAtReady int64
	// DemandBytes are the compressed bytes the worker fetched on demand
	// (ranged blob GETs) by the time the check exited.
	DemandBytes int64
	WorkerReady float64
	Err         string
}

// Options configure Run.
type Options struct {
	Workloads []Workload
	Profiles  []Profile
	Runs      int
	// Systems are the systems to measure (see AllSystems); empty means
	// all. The limits need plain containerd's runs and a trace.
	Systems []string
	// StargzBin is the directory holding containerd-stargz-grpc and
	// ctr-remote; without them the eStargz systems are left out, with a
	// note.
	StargzBin string
	// Logf reports progress.
	Logf func(format string, args ...any)
}

// Limit is the physical limit of one workload, from its trace.
type Limit struct {
	// StartupBytes are the compressed bytes of the chunks the traced run
	// read (distinct contents); StartupFileBytes of the whole files it
	// opened. UpdateBytes counts only the v2 startup chunks whose file
	// content v1 lacks.
	StartupBytes, StartupFileBytes, UpdateBytes, UpdateFileBytes int64
	// ImageBytes and UpdateImageBytes are all compressed contents of v1,
	// and those of v2 not in v1.
	ImageBytes, UpdateImageBytes int64
	Accesses, Files              int
	// LocalStart is the median readiness check time on a complete local
	// image (overlayfs), seconds.
	LocalStart float64
	Note       string
}

// Seconds is the limit on profile p: one round trip, the startup bytes at
// the link's rate, and the local start.
func (l Limit) Seconds(p Profile, update bool) float64 {
	b := l.StartupBytes
	if update {
		b = l.UpdateBytes
	}
	s := p.RTT.Seconds() + l.LocalStart
	if bps := p.BytesPerSecond(); bps > 0 {
		s += float64(b) / bps
	}
	return s
}

// Result is everything a run produced.
type Result struct {
	Started, Finished time.Time
	Profiles          []Profile
	Runs              int
	// Systems are the systems of the run, in result order; empty (a
	// replot of an older results.csv) means all.
	Systems []string
	Samples []Sample
	Limits  map[string]Limit // by workload name
	Notes   []string
	Machine string
	// FailureLogs hold the daemon logs of failed measurements.
	FailureLogs []string
}

// systems returns r.Systems, or every system when it is empty.
func (r *Result) systems() []string {
	if len(r.Systems) == 0 {
		return AllSystems()
	}
	return r.Systems
}

func (r *Result) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

// Run runs the benchmark. It fails only when the setup fails; a failed
// measurement is a sample with Err.
func Run(ctx context.Context, opts Options) (*Result, error) {
	r := &runner{opts: opts, res: &Result{Started: time.Now(), Profiles: opts.Profiles, Runs: opts.Runs, Limits: map[string]Limit{}}}
	sel, err := SelectSystems(opts.Systems)
	if err != nil {
		return r.res, err
	}
	r.res.Systems = sel
	if r.opts.Logf == nil {
		r.opts.Logf = func(string, ...any) {}
	}
	err = r.run(ctx)
	r.res.Finished = time.Now()
	return r.res, err
}
