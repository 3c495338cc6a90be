package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
)

func init() { commands = append(commands, newRecoverCmd) }

func newRecoverCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "recover (--qmp SOCKET [--qga SOCKET] | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID [--guest-agent])",
		Short: "Undo a snapshot set left behind by a vmshadow that was killed",
		Long: `recover thaws writers whose freeze was attempted, resumes the VM if vmshadow
paused it, removes the set's exports, filters, nodes and scratch files, and any
other vmshadow objects found in the VM. With --qga it also thaws the guest's file
systems if they are frozen. On a clean VM it does nothing.

With --xapi it removes the set's snapshot and snapshot VDIs (waiting for a
snapshot still being taken), and any other snapshot of the VM named vmshadow-*.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.session(cmd.Context(), a, true)
			if err != nil {
				return err
			}
			defer s.Close()
			rep, err := s.Recover(cmd.Context())
			if err != nil {
				return err
			}
			a.out.Summary(rep, func(w io.Writer) {
				if len(rep.Thawed)+len(rep.Removed) == 0 {
					fmt.Fprintf(w, "nothing to recover on %s\n", s.VM().Name)
					return
				}
				fmt.Fprintf(w, "recovered %s: thawed [%s], removed [%s]\n", s.VM().Name, strings.Join(rep.Thawed, ", "), strings.Join(rep.Removed, ", "))
			})
			return nil
		},
	}
	f.addVM(cmd)
	f.addWriters(cmd)
	return cmd
}
