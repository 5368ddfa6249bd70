package api

import (
	"encoding/json"
	"testing"
	"time"
)

func TestEntryJSONKeepsNameBytes(t *testing.T) {
	for _, e := range []Entry{
		{Name: "etc/passwd", Type: TypeReg, Mode: 0o644, ModTime: time.Unix(1, 0).UTC()},
		{Name: "bin-\xff\xfe", Type: TypeSymlink, LinkName: "t\x80rget", ModTime: time.Unix(1, 0).UTC()},
		{Name: "ü ñ", Type: TypeHardlink, LinkName: "a\xffb", ModTime: time.Unix(1, 0).UTC()},
	} {
		b, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		var got Entry
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		if got.Name != e.Name || got.LinkName != e.LinkName {
			t.Errorf("%q -> %q: %q, %q", e.Name, b, got.Name, got.LinkName)
		}
		// Valid names encode as the plain struct does.
		if plain, _ := json.Marshal(entryFields(e)); e.Name == "etc/passwd" && string(plain) != string(b) {
			t.Errorf("valid names encode as %s, want %s", b, plain)
		}
	}
}
