package integration

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3" // the registry's index, read beside it

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert/tempdir"
	"github.com/starlight-project/starlight/integration/harness"
)

// TestRegistryKilled kills the real registry with SIGKILL in the middle of
// a conversion and in the middle of indexing the converted layer, and
// starts it again: the job completes by itself, the temporary files of the
// killed process are gone, and the image has one converted tag and one
// job, with a complete index.
func TestRegistryKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test skipped in -short mode")
	}
	const files = 100_000
	layer := harness.Layer{}
	for i := 0; i < files; i++ {
		layer = append(layer, harness.Entry{Name: fmt.Sprintf("/usr/share/doc/pkg%03d/file%06d", i/1000, i)})
	}
	blob, diffID, err := harness.LayerBlob(layer)
	if err != nil {
		t.Fatal(err)
	}
	const entries = files + files/1000 + 3 // the files, pkgNNN, usr, usr/share, usr/share/doc

	for _, tc := range []struct {
		phase string
		// reached reports whether the registry is in the phase to kill it in.
		reached func(spool string, db *sql.DB) bool
	}{
		// Once estargz writes its own temporary files (esgzdata*, in
		// TMPDIR, which the registry points into its directory).
		{"conversion", func(spool string, _ *sql.DB) bool {
			return slices.ContainsFunc(spoolFiles(spool), func(f string) bool { return strings.HasPrefix(filepath.Base(f), "esgzdata") })
		}},
		{"indexing", func(_ string, db *sql.DB) bool {
			var n int
			err := db.QueryRow(`SELECT COUNT(*) FROM files WHERE layer_digest NOT IN (SELECT digest FROM layers)`).Scan(&n)
			return err == nil && n > 0
		}},
	} {
		t.Run(tc.phase, func(t *testing.T) {
			spool := harness.ShortTempDir(t, "spool-")
			// A short lease: the restarted registry retakes the killed
			// one's job once it expires.
			reg := harness.StartRegistry(t, harness.RegistryOptions{Workers: 1,
				Options: map[string]string{"tempdir": spool, "lease": "3s"}})
			db, err := sql.Open("sqlite3", "file:"+filepath.Join(reg.Dir, "index.db")+"?mode=ro&_busy_timeout=10000")
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()

			const repo, tag = "crash/app", "v1"
			l := reg.PushBlob(t, repo, blob, harness.MediaTypeLayerGzip)
			reg.PushLayers(t, repo, tag, []harness.Descriptor{l}, []string{diffID})
			deadline := time.Now().Add(5 * time.Minute)
			for !tc.reached(spool, db) {
				if st, _, _ := reg.Status(repo, tag); st.State == api.StateReady || st.State == api.StateFailed || time.Now().After(deadline) {
					t.Fatalf("the registry finished (%+v) before it was killed mid-%s", st, tc.phase)
				}
				time.Sleep(5 * time.Millisecond)
			}
			reg.Kill()
			killedDirs, _ := filepath.Glob(filepath.Join(spool, tempdir.Prefix+"*"))
			left := spoolFiles(spool)
			t.Logf("killed mid-%s; it left %v with %d temporary files: %v", tc.phase, killedDirs, len(left), left)
			if len(killedDirs) != 1 {
				t.Fatalf("process directories of the killed registry: %v", killedDirs)
			}

			reg.Restart(t)
			if _, err := os.Stat(killedDirs[0]); !os.IsNotExist(err) {
				t.Errorf("the killed registry's temporary directory survived the restart: %v %v", err, spoolFiles(spool))
			}
			st := reg.WaitReady(t, repo, tag)
			if st.Files != entries || st.Layers != 1 {
				t.Errorf("status after the restart: %+v, want %d files in 1 layer", st, entries)
			}
			if left := spoolFiles(spool); len(left) > 0 {
				t.Errorf("temporary files after the job: %v", left)
			}
			if dirs, _ := filepath.Glob(filepath.Join(spool, tempdir.Prefix+"*")); len(dirs) != 1 {
				t.Errorf("process directories under %s: %v, want the running registry's only", spool, dirs)
			}
			resp, body, err := reg.Get("/v2/"+repo+"/tags/list", true)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("tags: %v %v", resp, err)
			}
			var tags struct{ Tags []string }
			json.Unmarshal(body, &tags)
			slices.Sort(tags.Tags)
			if !slices.Equal(tags.Tags, []string{tag, tag + "-starlight"}) {
				t.Errorf("tags %v, want the pushed one and one converted tag", tags.Tags)
			}
			var jobs, indexed, rows int
			if err := db.QueryRow(`SELECT (SELECT COUNT(*) FROM jobs WHERE repository = ?),
				(SELECT COUNT(*) FROM layers), (SELECT COUNT(*) FROM files)`, repo).Scan(&jobs, &indexed, &rows); err != nil {
				t.Fatal(err)
			}
			if jobs != 1 || indexed != 1 || rows != entries {
				t.Errorf("index: %d jobs, %d layers, %d file rows; want 1, 1, %d", jobs, indexed, rows, entries)
			}
		})
	}
}

// spoolFiles lists the files in the process directories under root.
func spoolFiles(root string) []string {
	dirs, _ := filepath.Glob(filepath.Join(root, tempdir.Prefix+"*"))
	var out []string
	for _, d := range dirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			out = append(out, filepath.Join(filepath.Base(d), e.Name()))
		}
	}
	return out
}
