package main

import (
	"io"

	"github.com/spf13/cobra"
)

func newSnapshotCreateCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "create (--qmp SOCKET [--qga SOCKET] | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID [--guest-agent]) [--hook PATH]...",
		Short: "Take a snapshot set of every disk of a running VM",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.session(cmd.Context(), a, true)
			if err != nil {
				return err
			}
			defer s.Close()
			set, err := s.Create(cmd.Context())
			if err != nil {
				return err
			}
			info := set.Info()
			a.out.Summary(info, func(w io.Writer) { printSet(w, info) })
			return nil
		},
	}
	f.addVM(cmd)
	f.addSet(cmd)
	return cmd
}
