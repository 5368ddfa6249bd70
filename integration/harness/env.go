// Package harness starts the real components of Starlight (starlight-registry,
// containerd, dockerd, starlight-worker) as private daemons for end-to-end
// tests, the benchmark and the demo, and provides test images and a rootfs
// comparator.
//
// Every daemon runs from a private temporary directory on an ephemeral port
// or a private unix socket, and is stopped (by its own PID) and unmounted in a
// cleanup registered on the T that started it, even when the test fails.
package harness

import (
	"fmt"
	"os"
	"sync"
)

// T is the part of testing.TB the harness needs. *testing.T and *testing.B
// satisfy it; Env satisfies it for programs that are not tests (the demo,
// the benchmark) and for daemons shared by a whole test binary.
type T interface {
	Helper()
	Logf(format string, args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
	Failed() bool
}

// Env is a T outside of a test: cleanups run, last registered first, when
// Close is called. Fatalf panics with a *FatalError that Run recovers.
type Env struct {
	mu       sync.Mutex
	cleanups []func()
	failed   bool
	tempRoot string // see UseScratchFilesystem
	// Log receives Logf output; nil means stderr.
	Log func(format string, args ...any)
}

// FatalError is the panic value of Env.Fatalf.
type FatalError struct{ Msg string }

func (e *FatalError) Error() string { return e.Msg }

// NewEnv returns an empty Env.
func NewEnv() *Env { return &Env{} }

func (e *Env) Helper() {}

func (e *Env) Logf(format string, args ...any) {
	if e.Log != nil {
		e.Log(format, args...)
		return
	}
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func (e *Env) Fatalf(format string, args ...any) {
	e.mu.Lock()
	e.failed = true
	e.mu.Unlock()
	panic(&FatalError{Msg: fmt.Sprintf(format, args...)})
}

func (e *Env) Cleanup(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, f)
}

func (e *Env) Failed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.failed
}

// Run calls fn and turns a Fatalf inside it into an error.
func (e *Env) Run(fn func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			fe, ok := r.(*FatalError)
			if !ok {
				panic(r)
			}
			err = fe
		}
	}()
	fn()
	return nil
}

// Close runs the registered cleanups, last first.
func (e *Env) Close() {
	for {
		e.mu.Lock()
		n := len(e.cleanups)
		if n == 0 {
			e.mu.Unlock()
			return
		}
		f := e.cleanups[n-1]
		e.cleanups = e.cleanups[:n-1]
		e.mu.Unlock()
		f()
	}
}

// shared is the lifetime of daemons shared by all tests of a test binary
// (dockerd, built binaries). Main closes it after the tests ran.
var shared = NewEnv()

// Main runs the tests of a package that uses shared daemons and stops them
// afterwards. Use it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }
func Main(m interface{ Run() int }) int {
	code := m.Run()
	shared.Close()
	return code
}
