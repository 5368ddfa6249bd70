package api

import (
	"encoding/json"
	"unicode/utf8"
)

// A file name is bytes, not always valid UTF-8, and encoding/json replaces
// every invalid byte of a string with U+FFFD. An Entry whose Name or
// LinkName is not valid UTF-8 therefore also carries it as bytes
// ("nameBytes", "linkNameBytes", base64 in JSON), which a decoder prefers;
// "name" and "linkName" keep the readable, replaced form. Entries with
// valid names encode exactly as the plain struct would.

// entryFields is Entry without its JSON methods.
type entryFields Entry

type entryJSON struct {
	entryFields
	NameBytes     []byte `json:"nameBytes,omitempty"`
	LinkNameBytes []byte `json:"linkNameBytes,omitempty"`
}

// MarshalJSON implements json.Marshaler.
func (e Entry) MarshalJSON() ([]byte, error) {
	j := entryJSON{entryFields: entryFields(e)}
	if !utf8.ValidString(e.Name) {
		j.NameBytes = []byte(e.Name)
	}
	if !utf8.ValidString(e.LinkName) {
		j.LinkNameBytes = []byte(e.LinkName)
	}
	return json.Marshal(j)
}

// UnmarshalJSON implements json.Unmarshaler.
func (e *Entry) UnmarshalJSON(b []byte) error {
	var j entryJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*e = Entry(j.entryFields)
	if j.NameBytes != nil {
		e.Name = string(j.NameBytes)
	}
	if j.LinkNameBytes != nil {
		e.LinkName = string(j.LinkNameBytes)
	}
	return nil
}
