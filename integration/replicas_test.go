package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/schema"
)

// TestRegistryReplicas is the acceptance test of a scaled-out registry:
// two starlight-registry processes on one PostgreSQL index and one S3
// bucket (versitygw), the way a Deployment with replicas runs them.
//
//   - Images pushed through replica A are converted exactly once each,
//     while both replicas' workers race for the jobs: one conversion log
//     line and one converted tag per push, every job ready after one
//     attempt.
//   - A worker pulls through replica B and runs the image; its startup
//     trace reported to B orders the bundle replica A plans.
//   - Killing (SIGKILL) the replica holding a conversion lease makes the
//     other finish the job once the lease has expired, with no duplicate
//     converted tag. The takeover time is logged, not asserted.
func TestRegistryReplicas(t *testing.T) {
	requireRoot(t)
	pg := harness.StartPostgres(t)
	dsn := pg.CreateDatabase(t, "starlight")
	bucket := harness.StartS3(t).CreateBucket(t, "starlight")
	// A short lease, so that the takeover below is quick; renewed every
	// lease/3 while a conversion runs.
	const lease = 5 * time.Second
	opts := harness.RegistryOptions{S3: bucket, Database: dsn, Options: map[string]string{"lease": lease.String()}}
	a := harness.StartRegistry(t, opts)
	b := harness.StartRegistry(t, opts)
	name := map[int]string{a.PID(): "A", b.PID(): "B"}
	index, err := schema.Open(context.Background(), dsn)
	if err != nil {
		t.Fatalf("open the shared index: %v", err)
	}
	t.Cleanup(func() { index.Close() })

	// The layers first, then the manifests back to back: the jobs are
	// queued within moments of each other, and the four conversion
	// workers of the two replicas race for them.
	const repo, n = "e2e/replicas", 8
	bucket.KeepUploads(t, repo)
	tags := make([]string, n)
	layers := make([][]harness.Descriptor, n)
	diffIDs := make([][]string, n)
	for i := range tags {
		tags[i] = fmt.Sprintf("v%d", i+1)
		layers[i], diffIDs[i] = pushLayers(t, a, repo, harness.BusyboxLayer(), replicaImage(i))
	}
	timed(t, fmt.Sprintf("%d manifest pushes through replica A", n), func() {
		for i, tag := range tags {
			a.PushLayers(t, repo, tag, layers[i], diffIDs[i])
		}
	})
	timed(t, "conversions (polled through replica B)", func() {
		for _, tag := range tags {
			b.WaitReady(t, repo, tag)
		}
	})

	t.Run("converted once each", func(t *testing.T) {
		started := logCounts(t, []*harness.Registry{a, b}, "starlight: conversion job started", "tag")
		written := logCounts(t, []*harness.Registry{a, b}, "starlight: converted tag written", "convertedTag")
		byReplica := map[string]int{}
		for _, tag := range tags {
			if got := started[tag]; got != 1 {
				t.Errorf("%s: %d conversion jobs started, want 1", tag, got)
			}
			if got := written[tag+"-starlight"]; got != 1 {
				t.Errorf("%s: converted tag written %d times, want 1", tag, got)
			}
			job, err := index.Job(context.Background(), repo, mustDigest(t, a, repo, tag), tag)
			if err != nil {
				t.Fatalf("job of %s: %v", tag, err)
			}
			if job.State != api.StateReady || job.Attempts != 1 {
				t.Errorf("job %s: state %q after %d attempts, want ready after 1", job, job.State, job.Attempts)
			}
		}
		for _, r := range []*harness.Registry{a, b} {
			byReplica[name[r.PID()]] = len(logCounts(t, []*harness.Registry{r}, "starlight: conversion job started", "tag"))
		}
		t.Logf("%d pushes through A, each converted once: %d conversions ran on A, %d on B", n, byReplica["A"], byReplica["B"])
		if byReplica["B"] == 0 {
			t.Logf("NOTE: replica B converted nothing: A kept up with the pushes, the replicas did not race this time")
		}
		checkTags(t, b, repo, tags)
		if t.Failed() {
			// Why a job ran twice is in the logs: a failed attempt, a lost lease.
			for _, r := range []*harness.Registry{a, b} {
				t.Logf("replica %s's warnings and errors:\n%s", name[r.PID()], logLines(t, r, "level=error", "level=warning"))
			}
		}
		// The content is in the bucket, not on a local disk.
		if keys := bucket.Keys(t, "docker/registry/v2/blobs/"); len(keys) == 0 {
			t.Error("the bucket holds no blob")
		}
	})

	t.Run("bundle and trace through B", func(t *testing.T) {
		node := harness.StartNode(t, b.URL)
		const ns = "replicas"
		ref := b.Addr + "/" + repo + ":" + tags[1]
		node.Worker.CLI(t, ns, "pull", "--plain-http", "--wait", ref)
		out := node.Containerd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("replica"), "cat", "/id.txt")
		mustContain(t, "container pulled through B", out, "image 1")

		id := uniqueID("traced")
		node.Worker.CLI(t, ns, "--address", node.Containerd.Address, "create", "--optimize", ref, id,
			"--", "/bin/sh", "-c", "cat /data/f019 >/dev/null && cat /id.txt")
		out = node.Containerd.CtrNS(t, ns, "tasks", "start", id)
		mustContain(t, "traced container", out, "image 1")
		node.Containerd.CtrNS(t, ns, "containers", "rm", id)
		tr := pendingTrace(t, node.Worker, id)
		out = node.Worker.CLI(t, ns, "report")
		mustContain(t, "ctr-starlight report", out, "sent to "+b.URL)

		// Replica A plans from the same index: the traced files first.
		h, _, err := a.DeltaHeader(api.DeltaRequest{Reference: repo + ":" + tags[1]})
		if err != nil {
			t.Fatal(err)
		}
		// On-demand reads are ranged blob GETs: through B (distribution
		// redirects them to the bucket) they get the bytes A serves.
		layer := h.Layers[len(h.Layers)-1].Digest
		whole := blobRange(t, a, repo, layer, "")
		part := blobRange(t, b, repo, layer, "bytes=100-4195")
		if !bytes.Equal(part, whole[100:4196]) {
			t.Errorf("ranged GET of %s through B: %d bytes that differ from A's", layer, len(part))
		}

		want := expectedPrefix(t, h, tr)
		if len(want) == 0 {
			t.Fatalf("the trace names no frame of the bundle:\n%s", describeTrace(tr))
		}
		for i, fi := range want {
			if fi != i {
				t.Errorf("A's bundle: frame %d is %s, want %s (traced through B)\nframes:\n%s\ntrace:\n%s",
					i, describeFrame(h, h.Frames[i]), describeFrame(h, h.Frames[fi]),
					describeFrames(h, 0, len(want)+3), describeTrace(tr))
				break
			}
		}
	})

	t.Run("takeover of a killed lease", func(t *testing.T) {
		// A conversion long enough to be caught holding its lease: one
		// incompressible 48 MiB file. Should it finish in the instant
		// between the look at its lease and the kill, a new replica
		// replaces the killed one and the next push tries again.
		live := []*harness.Registry{a, b}
		pushed := slices.Clone(tags)
		for attempt := 1; attempt <= 3; attempt++ {
			tag := fmt.Sprintf("slow%d", attempt)
			descs, diffIDs := pushLayers(t, live[0], repo, harness.BusyboxLayer(),
				harness.Layer{{Name: "/big", RandomSize: 48 << 20, RandomSeed: uint64(attempt)}})
			live[0].PushLayers(t, repo, tag, descs, diffIDs)
			pushed = append(pushed, tag)
			dgst := mustDigest(t, live[0], repo, tag)
			job := waitJob(t, index, repo, dgst, tag, func(j *schema.Job) bool { return j.State != api.StateQueued })
			if job.State != api.StateConverting {
				t.Logf("%s was %s before it could be seen converting", tag, job.State)
				continue
			}
			holder, other := live[0], live[1]
			if ownerPID(t, job.Owner) == other.PID() {
				holder, other = other, holder
			}
			holder.Kill()
			killed := time.Now()
			after, err := index.Job(context.Background(), repo, dgst, tag)
			if err != nil {
				t.Fatal(err)
			}
			if after.State != api.StateConverting || after.Owner != job.Owner {
				t.Logf("%s: the conversion finished before replica %s was killed (%s); a new replica replaces it",
					tag, name[holder.PID()], after.State)
				c := harness.StartRegistry(t, opts)
				name[c.PID()] = fmt.Sprintf("R%d", len(name)+1)
				live = []*harness.Registry{other, c}
				continue
			}
			t.Logf("killed replica %s (pid %d) holding the lease of %s until %s",
				name[holder.PID()], holder.PID(), tag, job.LeaseUntil.Format(time.StampMilli))

			taken := waitJob(t, index, repo, dgst, tag, func(j *schema.Job) bool { return j.Owner != job.Owner })
			takeover := time.Since(killed)
			st := other.WaitReady(t, repo, tag)
			ready := time.Since(killed)
			t.Logf("replica %s took the job over %s after the kill (lease %s) and had it converted %s after the kill",
				name[other.PID()], takeover.Round(time.Millisecond), lease, ready.Round(time.Millisecond))
			if taken.State == api.StateConverting && ownerPID(t, taken.Owner) != other.PID() {
				t.Errorf("job %s taken over by %q, not by replica %s", taken, taken.Owner, name[other.PID()])
			}
			final, err := index.Job(context.Background(), repo, dgst, tag)
			if err != nil {
				t.Fatal(err)
			}
			if final.State != api.StateReady || final.Attempts != 2 {
				t.Errorf("job %s: state %q after %d attempts, want ready after 2 (the killed one and the takeover)",
					final, final.State, final.Attempts)
			}
			if d, err := other.ManifestDigest(repo, tag+"-starlight"); err != nil || d != st.ConvertedDigest {
				t.Errorf("converted tag %s-starlight resolves to %q (%v), the status says %q", tag, d, err, st.ConvertedDigest)
			}
			if got := logCounts(t, []*harness.Registry{other}, "starlight: converted tag written", "convertedTag")[tag+"-starlight"]; got != 1 {
				t.Errorf("replica %s wrote %s-starlight %d times, want 1", name[other.PID()], tag, got)
			}
			checkTags(t, other, repo, pushed)
			return
		}
		t.Fatalf("three 48 MiB conversions finished before their replica could be killed holding the lease")
	})
}

// blobRange GETs a blob of repo (all of it when rng is empty), following
// redirects as containerd's resolver does.
func blobRange(t *testing.T, r *harness.Registry, repo, dgst, rng string) []byte {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, r.URL+"/v2/"+repo+"/blobs/"+dgst, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := http.StatusOK
	if rng != "" {
		req.Header.Set("Range", rng)
		want = http.StatusPartialContent
	}
	resp, body, err := r.Do(req, true)
	if err != nil {
		t.Fatalf("GET blob %s: %v", dgst, err)
	}
	if resp.StatusCode != want {
		t.Fatalf("GET blob %s (Range %q): %s: %s", dgst, rng, resp.Status, body)
	}
	t.Logf("GET blob %s (Range %q) through %s: %s from %s", dgst, rng, r.Addr, resp.Status, resp.Request.URL.Host)
	return body
}

// replicaImage is the top layer of the i-th image of
// TestRegistryReplicas's pushes: its own /id.txt and 20 files of 64 KiB
// (the busybox base layer below is shared by all).
func replicaImage(i int) harness.Layer {
	l := harness.Layer{{Name: "/id.txt", Content: fmt.Appendf(nil, "image %d\n", i)}}
	for f := range 20 {
		l = append(l, harness.Entry{Name: fmt.Sprintf("/data/f%03d", f), RandomSize: 64 << 10, RandomSeed: uint64(1000*i + f)})
	}
	return l
}

// pushLayers pushes the layers' blobs to repo over HTTP and returns their
// descriptors and diff IDs, for Registry.PushLayers.
func pushLayers(t *testing.T, r *harness.Registry, repo string, layers ...harness.Layer) ([]harness.Descriptor, []string) {
	t.Helper()
	var descs []harness.Descriptor
	var diffIDs []string
	for _, l := range layers {
		blob, diffID, err := harness.LayerBlob(l)
		if err != nil {
			t.Fatal(err)
		}
		descs = append(descs, r.PushBlob(t, repo, blob, harness.MediaTypeLayerGzip))
		diffIDs = append(diffIDs, diffID)
	}
	return descs, diffIDs
}

func mustDigest(t *testing.T, r *harness.Registry, repo, tag string) string {
	t.Helper()
	d, err := r.ManifestDigest(repo, tag)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// waitJob polls the index until the job satisfies cond, and returns it.
func waitJob(t *testing.T, index *schema.DB, repo, dgst, tag string, cond func(*schema.Job) bool) *schema.Job {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		j, err := index.Job(context.Background(), repo, dgst, tag)
		if err != nil && err != schema.ErrNotFound {
			t.Fatal(err)
		}
		if j != nil && cond(j) {
			return j
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s:%s: no change in time, last %+v", repo, tag, j)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ownerPID is the process id in a job lease's owner (host/pid/random).
func ownerPID(t *testing.T, owner string) int {
	t.Helper()
	parts := strings.Split(owner, "/")
	if len(parts) != 3 {
		t.Fatalf("job owner %q is not host/pid/random", owner)
	}
	pid, err := strconv.Atoi(parts[1])
	if err != nil {
		t.Fatalf("job owner %q: %v", owner, err)
	}
	return pid
}

// logCounts counts, over the registries' whole logs, the lines with
// message msg by the value of their field.
func logCounts(t *testing.T, regs []*harness.Registry, msg, field string) map[string]int {
	t.Helper()
	re := regexp.MustCompile(`(?:^| )` + regexp.QuoteMeta(field) + `=("(?:[^"\\]|\\.)*"|\S+)`)
	counts := map[string]int{}
	for _, r := range regs {
		b, err := os.ReadFile(filepath.Join(r.Dir, "registry.log"))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.Contains(line, `msg="`+msg+`"`) {
				continue
			}
			m := re.FindStringSubmatch(line)
			if m == nil {
				t.Fatalf("log line without %s: %s", field, line)
			}
			v := m[1]
			if uq, err := strconv.Unquote(v); err == nil {
				v = uq
			}
			counts[v]++
		}
	}
	return counts
}

// logLines returns the lines of r's whole log that contain any of subs.
func logLines(t *testing.T, r *harness.Registry, subs ...string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(r.Dir, "registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		for _, s := range subs {
			if strings.Contains(line, s) {
				out = append(out, line)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// checkTags fails unless repo's tags are exactly the pushed ones and one
// converted tag for each.
func checkTags(t *testing.T, r *harness.Registry, repo string, pushed []string) {
	t.Helper()
	_, body, err := r.Get("/v2/"+repo+"/tags/list", true)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Tags []string `json:"tags"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("tags list %q: %v", body, err)
	}
	var want []string
	for _, tag := range pushed {
		want = append(want, tag, tag+"-starlight")
	}
	slices.Sort(want)
	slices.Sort(list.Tags)
	if !slices.Equal(list.Tags, want) {
		t.Errorf("tags of %s: %v, want %v", repo, list.Tags, want)
	}
}

// TestJobLeasesRaceOnPostgres races the conversion workers of two
// replicas (two connections to one PostgreSQL index, four leasing
// goroutines each) over jobs that must not run at the same time: images
// each pushed under the same two tags, so no two jobs of one image
// (converted once, not twice at once) nor of one tag (the converted tag
// follows the pushes) may hold leases together. Each job must be leased
// exactly once.
func TestJobLeasesRaceOnPostgres(t *testing.T) {
	requireRoot(t)
	pg := harness.StartPostgres(t)
	dsn := pg.CreateDatabase(t, "leases")
	ctx := context.Background()
	var replicas []*schema.DB
	for range 2 {
		d, err := schema.Open(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		replicas = append(replicas, d)
	}
	const images = 200
	digest := func(i int) string { return fmt.Sprintf("sha256:%064x", i) }
	var jobs int
	for i := range images {
		// Every image under two tags, every tag on every image: at most
		// one of these jobs can run at a time.
		for _, tag := range []string{"a", "b"} {
			p := schema.Push{Digest: digest(i), Tag: tag}
			p.Repository, p.MediaType = "e2e/leases", harness.MediaTypeOCIManifest
			if _, err := replicas[0].Enqueue(ctx, p); err != nil {
				t.Fatal(err)
			}
			jobs++
		}
	}

	var (
		mu         sync.Mutex
		byImage    = map[string]int{} // leases held now
		byTag      = map[string]int{}
		leased     = map[string]int{} // leases taken, by job
		done       int
		violations []string
	)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db := replicas[g%2]
			owner := fmt.Sprintf("replica%d/%d/worker", g%2, g)
			for {
				j, err := db.LeaseJob(ctx, owner, time.Minute)
				if errors.Is(err, schema.ErrNotFound) {
					mu.Lock()
					finished := done == jobs
					mu.Unlock()
					if finished {
						return
					}
					time.Sleep(time.Millisecond)
					continue
				}
				if err != nil {
					t.Errorf("lease: %v", err)
					return
				}
				mu.Lock()
				leased[j.String()]++
				byImage[j.Digest]++
				byTag[j.Tag]++
				if byImage[j.Digest] > 1 || byTag[j.Tag] > 1 {
					violations = append(violations, fmt.Sprintf("%s leased by %s while another job of its image or tag ran", j, owner))
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond) // the "conversion"
				mu.Lock()
				byImage[j.Digest]--
				byTag[j.Tag]--
				mu.Unlock()
				if err := db.CompleteJob(ctx, j); err != nil {
					t.Errorf("complete: %v", err)
					return
				}
				mu.Lock()
				done++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(violations) > 0 {
		t.Errorf("%d of %d jobs ran beside another job of their image or tag:\n%s", len(violations), jobs, strings.Join(violations, "\n"))
	}
	if len(leased) != jobs {
		t.Errorf("%d jobs leased, want %d", len(leased), jobs)
	}
	for j, n := range leased {
		if n != 1 {
			t.Errorf("job %s leased %d times", j, n)
		}
	}
}
