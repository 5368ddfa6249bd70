package api

import (
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// A file name is bytes, not always valid UTF-8, and encoding/json replaces
// every invalid byte of a string with U+FFFD. A LayerTree whose entries
// have such names or link targets therefore also carries them as bytes, in
// "rawNames" (base64 in JSON), which a decoder applies; the entries keep
// the readable, replaced form. A tree whose names are all valid encodes
// exactly as the plain struct would. (The escape is per tree, not per
// entry: a json.Marshaler on Entry would triple the cost of every entry.)

// layerTreeFields is LayerTree without its JSON methods.
type layerTreeFields LayerTree

// RawName gives the exact bytes of the name and link name of one entry of
// a LayerTree, by index, where they are not valid UTF-8.
type RawName struct {
	Entry    int    `json:"entry"`
	Name     []byte `json:"name,omitempty"`
	LinkName []byte `json:"linkName,omitempty"`
}

type layerTreeJSON struct {
	layerTreeFields
	RawNames []RawName `json:"rawNames,omitempty"`
}

// MarshalJSON implements json.Marshaler.
func (t LayerTree) MarshalJSON() ([]byte, error) {
	j := layerTreeJSON{layerTreeFields: layerTreeFields(t)}
	for i := range t.Entries {
		e := &t.Entries[i]
		if utf8.ValidString(e.Name) && utf8.ValidString(e.LinkName) {
			continue
		}
		r := RawName{Entry: i}
		if !utf8.ValidString(e.Name) {
			r.Name = []byte(e.Name)
		}
		if !utf8.ValidString(e.LinkName) {
			r.LinkName = []byte(e.LinkName)
		}
		j.RawNames = append(j.RawNames, r)
	}
	return json.Marshal(j)
}

// UnmarshalJSON implements json.Unmarshaler.
func (t *LayerTree) UnmarshalJSON(b []byte) error {
	var j layerTreeJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*t = LayerTree(j.layerTreeFields)
	for _, r := range j.RawNames {
		if r.Entry < 0 || r.Entry >= len(t.Entries) {
			return fmt.Errorf("layer tree %s: raw name of entry %d out of range", t.Digest, r.Entry)
		}
		e := &t.Entries[r.Entry]
		if r.Name != nil {
			e.Name = string(r.Name)
		}
		if r.LinkName != nil {
			e.LinkName = string(r.LinkName)
		}
	}
	return nil
}
