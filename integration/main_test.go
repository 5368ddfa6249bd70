// Package integration holds Starlight's end-to-end tests: the real
// starlight-registry, starlight-worker and ctr-starlight binaries with real
// containerd, runc, FUSE and dockerd, all started privately by the harness.
package integration

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
)

func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

// requireRoot skips the test when the machine cannot run it. These tests
// run everywhere CI runs (as root with /dev/fuse); a skip is loud on
// purpose so that a green run without them is noticed.
func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: THIS END-TO-END TEST REQUIRES ROOT (containerd, runc, overlayfs, FUSE)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("SKIPPED: THIS END-TO-END TEST REQUIRES ROOT AND /dev/fuse: " + err.Error())
	}
}

var idSeq atomic.Int64

// uniqueID returns a container id that no other test of this process uses
// (runc's state directory is shared by every containerd on the machine).
func uniqueID(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), idSeq.Add(1))
}

// probeScript prints what a user would look at in a container of the
// tricky image: contents, modes, owners, links, devices, whiteouts and the
// opaque directory. The listing of the whole tree leaves out the eStargz
// metadata files when hideEStargz is set: a plain unpack of a converted
// image shows them, Starlight does not.
func probeScript(hideEStargz bool) string {
	filter := "cat"
	if hideEStargz {
		filter = "grep -v -x -e /stargz.index.json -e /.no.prefetch.landmark -e /.prefetch.landmark"
	}
	return strings.ReplaceAll(probeTemplate, "FILTER", filter)
}

const probeTemplate = `set -e
cd /data
busybox sha256sum big hello.txt hl-a hl-b sub/hl-c caps setuid owned 'name with spaces.txt' /small.txt /opq/new
find /data /opq ! -type d -exec stat -c '%n %A %u:%g %s %h %t:%T' {} + | sort
find /data /opq -type d -exec stat -c '%n %A %u:%g' {} + | sort
for l in link abs-link dangling; do readlink $l; done
cat hello.txt link abs-link
ls -a /opq /data | tr '\n' ' '
echo
test ! -e todelete && test ! -e dir-todelete && test ! -e /opq/a && test ! -e /opq/sub && echo whiteouts-ok
find / -xdev | FILTER | sort | busybox sha256sum
wc -c big
echo done
`

// mustContain fails unless out contains every want.
func mustContain(t *testing.T, what, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("%s: output lacks %q:\n%s", what, w, out)
		}
	}
}

// expectedProbe lists strings probeScript must print for the tricky image.
func expectedProbe(t *testing.T, spec harness.ImageSpec) []string {
	t.Helper()
	var wants []string
	for _, name := range []string{"/data/big", "/data/hello.txt", "/data/hl-a", "/data/caps", "/small.txt", "/opq/new"} {
		e, ok := spec.Lookup(name)
		if !ok {
			t.Fatalf("the test image has no %s", name)
		}
		sum, err := e.SHA256()
		if err != nil {
			t.Fatal(err)
		}
		wants = append(wants, sum)
	}
	return append(wants,
		"hello again from layer 3",
		"whiteouts-ok",
		"/data/setuid -rwsr-xr-x 0:0",
		"/data/owned -rw-r----- 1000:1001",
		"/data/modeonly -rw------- 0:0",
		"/data/chardev crw-rw-rw- 0:0 0 1 1:3",
		"/data/fifo prw-r--r--",
		"/data/hl-a -rw-r--r-- 0:0 20 3",
		"/data/sticky drwxrwxrwt 0:0",
		"done",
	)
}

// timed logs how long f took.
func timed(t *testing.T, what string, f func()) {
	t.Helper()
	start := time.Now()
	f()
	t.Logf("%s: %s", what, time.Since(start).Round(time.Millisecond))
}
