// Package s3server holds no code: its module pins versitygw
// (github.com/versity/versitygw), the S3 server of the end-to-end tests, as
// a `tool` directive, so that versitygw's dependencies stay out of
// Starlight's go.mod. integration/harness builds it (`go tool -n versitygw`
// in this directory, which keeps the executable in the Go build cache) once
// per test process and runs its posix backend over a private directory; see
// harness.StartS3.
package s3server
