package convert

import "errors"

// ErrInvalid is matched (errors.Is) by every error caused by the image
// itself: a malformed or hostile layer, a config that does not match its
// layers, an unsupported media type. Converting the same image again cannot
// succeed, so callers should fail at once instead of retrying; any other
// error (storage, cancellation) may be transient.
var ErrInvalid = errors.New("invalid image")

type invalidError struct{ err error }

func (e invalidError) Error() string   { return e.err.Error() }
func (e invalidError) Unwrap() []error { return []error{e.err, ErrInvalid} }

// invalid marks err as caused by the image.
func invalid(err error) error { return invalidError{err} }
