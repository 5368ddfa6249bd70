package api

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

func TestLayerTreeJSONKeepsNameBytes(t *testing.T) {
	at := time.Unix(1, 0).UTC()
	tree := LayerTree{Digest: "sha256:1", Entries: []Entry{
		{Name: "etc/passwd", Type: TypeReg, Mode: 0o644, ModTime: at},
		{Name: "bin-\xff\xfe", Type: TypeSymlink, LinkName: "t\x80rget", ModTime: at},
		{Name: "ü ñ", Type: TypeHardlink, LinkName: "a\xffb", ModTime: at},
	}}
	b, err := json.Marshal(tree)
	if err != nil {
		t.Fatal(err)
	}
	var got LayerTree
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, tree) {
		t.Errorf("%s decodes as %+v", b, got)
	}
	// Valid names encode as the plain struct does.
	valid := LayerTree{Digest: "sha256:1", Entries: tree.Entries[:1]}
	b, _ = json.Marshal(valid)
	if plain, _ := json.Marshal(layerTreeFields(valid)); string(plain) != string(b) {
		t.Errorf("valid names encode as %s, want %s", b, plain)
	}
	if err := json.Unmarshal([]byte(`{"digest":"sha256:1","entries":[],"rawNames":[{"entry":3}]}`), &got); err == nil {
		t.Error("a raw name of an entry out of range decodes")
	}
}
