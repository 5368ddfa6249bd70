package main

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/term"
)

// parseUser reads a --user value as ctr does: "user:password", or "user"
// alone, whose password is then asked on the terminal (never echoed).
func parseUser(value string) (user, password string, err error) {
	user, password, ok := strings.Cut(value, ":")
	if ok {
		return user, password, nil
	}
	fd := int(os.Stdin.Fd())
	if !term.IsTerminal(fd) {
		return "", "", fmt.Errorf("--user %s: want user:password (no terminal to ask the password on)", user)
	}
	fmt.Fprintf(os.Stderr, "Password for %s: ", user)
	b, err := term.ReadPassword(fd)
	fmt.Fprintln(os.Stderr)
	if err != nil {
		return "", "", fmt.Errorf("--user: reading the password: %w", err)
	}
	return user, string(b), nil
}
