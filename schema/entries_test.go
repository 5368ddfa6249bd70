package schema

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
)

// TestEntryRoundTrip pins what a files row reads back as: the mode keeps
// permissions and setuid/setgid/sticky only, and a missing mtime is the
// epoch, as convert.ReadIndex reads a TOC.
func TestEntryRoundTrip(t *testing.T) {
	epoch := time.Unix(0, 0).UTC()
	for _, tc := range []struct {
		name      string
		mode      uint32
		mtime     time.Time
		wantMode  uint32
		wantMtime time.Time
	}{
		{"plain", 0o644, time.Unix(1_700_000_000, 0).UTC(), 0o644, time.Unix(1_700_000_000, 0).UTC()},
		{"setuid", 0o4755, epoch, 0o4755, epoch},
		{"setgid", 0o2755, epoch, 0o2755, epoch},
		{"sticky", 0o1777, epoch, 0o1777, epoch},
		{"all special bits", 0o7777, epoch, 0o7777, epoch},
		{"no permissions", 0o000, epoch, 0o000, epoch},
		{"type bits are dropped", 0o100644, epoch, 0o644, epoch},
		{"zero time reads as the epoch", 0o644, time.Time{}, 0o644, epoch},
		{"nanoseconds kept", 0o644, time.Unix(1_600_000_000, 123).UTC(), 0o644, time.Unix(1_600_000_000, 123).UTC()},
		{"before the epoch", 0o644, time.Unix(-86400, 0).UTC(), 0o644, time.Unix(-86400, 0).UTC()},
		{"local time reads as UTC", 0o644, time.Unix(1_700_000_000, 0).In(time.FixedZone("X", 3600)), 0o644, time.Unix(1_700_000_000, 0).UTC()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			db := openTest(t)
			l := &Layer{Digest: "sha256:1a", DiffID: "sha256:d1ff", TOCDigest: "sha256:70c", Entries: []api.Entry{
				{Name: "f", Type: api.TypeDir, Mode: tc.mode, ModTime: tc.mtime},
			}}
			if err := db.PutLayer(ctx, l); err != nil {
				t.Fatal(err)
			}
			got, err := db.GetLayer(ctx, l.Digest)
			if err != nil {
				t.Fatal(err)
			}
			want := api.Entry{Name: "f", Type: api.TypeDir, Mode: tc.wantMode, ModTime: tc.wantMtime}
			if len(got.Entries) != 1 || !reflect.DeepEqual(got.Entries[0], want) {
				t.Errorf("read back %+v, want %+v", got.Entries, want)
			}
		})
	}
}

// TestEntryNamesRoundTrip: names and link targets are bytes; those that are
// not UTF-8 (which PostgreSQL's TEXT refuses) read back as they were.
func TestEntryNamesRoundTrip(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	entries := []api.Entry{
		{Name: "plain", Type: api.TypeSymlink, LinkName: "/etc/passwd"},
		{Name: "bin-\xff\xfe", Type: api.TypeSymlink, LinkName: "t\x80rget"},
		{Name: "\x01escaped", Type: api.TypeSymlink, LinkName: "\x01x"},
		{Name: "ü ñ", Type: api.TypeHardlink, LinkName: "bin-\xff\xfe"},
	}
	for i := range entries {
		entries[i].ModTime = time.Unix(0, 0).UTC()
	}
	if err := db.PutLayer(ctx, &Layer{Digest: "sha256:2b", DiffID: "sha256:d2", TOCDigest: "sha256:70d", Entries: entries}); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetLayer(ctx, "sha256:2b")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Entries, entries) {
		t.Errorf("read back %+v, want %+v", got.Entries, entries)
	}
}
