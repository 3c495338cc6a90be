package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func init() { commands = append(commands, newExitCodesCmd) }

type exitCode struct {
	Code    int    `json:"code"`
	Meaning string `json:"meaning"`
}

func exitCodeTable() []exitCode {
	t := []exitCode{{0, "success"}, {1, "failure"}}
	for _, c := range errs.All {
		t = append(t, exitCode{c.ExitCode(), c.Error()})
	}
	return t
}

func newExitCodesCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "exit-codes",
		Short: "Print the table of exit codes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			t := exitCodeTable()
			a.out.Summary(struct {
				Codes []exitCode `json:"codes"`
			}{t}, func(w io.Writer) {
				for _, c := range t {
					fmt.Fprintf(w, "%4d  %s\n", c.Code, c.Meaning)
				}
			})
			return nil
		},
	}
}
