package main

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/term"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Passwords never come from the command line: from an environment
// variable, a file, or a terminal prompt, in that order.

// passwordSource returns a function that gets a password from env, from
// file, or by prompting on the terminal (twice when confirm).
func passwordSource(env, file, prompt string, confirm bool) func() ([]byte, error) {
	return func() ([]byte, error) {
		if v, ok := os.LookupEnv(env); ok {
			if v == "" {
				return nil, fmt.Errorf("%s is set but empty: %w", env, errs.ErrUsage)
			}
			return []byte(v), nil
		}
		if file != "" {
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, fmt.Errorf("cannot read password file %s (%v): %w", file, pathErr(err), errs.ErrUsage)
			}
			b = bytes.TrimSuffix(b, []byte("\n"))
			b = bytes.TrimSuffix(b, []byte("\r"))
			if len(b) == 0 {
				return nil, fmt.Errorf("password file %s is empty: %w", file, errs.ErrUsage)
			}
			return b, nil
		}
		fd := int(os.Stdin.Fd())
		if !term.IsTerminal(fd) {
			return nil, fmt.Errorf("no password: set %s or give a password file (passwords are never taken from the command line): %w", env, errs.ErrUsage)
		}
		fmt.Fprint(os.Stderr, prompt+": ")
		pw, err := term.ReadPassword(fd)
		fmt.Fprintln(os.Stderr)
		if err != nil {
			return nil, fmt.Errorf("read password from terminal: %w", err)
		}
		if len(pw) == 0 {
			return nil, fmt.Errorf("empty password: %w", errs.ErrUsage)
		}
		if confirm {
			fmt.Fprint(os.Stderr, "Repeat "+prompt+": ")
			again, err := term.ReadPassword(fd)
			fmt.Fprintln(os.Stderr)
			if err != nil {
				return nil, fmt.Errorf("read password from terminal: %w", err)
			}
			if !bytes.Equal(pw, again) {
				return nil, fmt.Errorf("the passwords do not match: %w", errs.ErrUsage)
			}
		}
		return pw, nil
	}
}
