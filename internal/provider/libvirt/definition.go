package libvirt

import (
	"context"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// DomainXML returns the domain's definition for storage with a backup:
// with inactive, the persistent configuration (what a restore defines;
// virDomainGetXMLDesc with VIR_DOMAIN_XML_INACTIVE), else the running one.
// VIR_DOMAIN_XML_SECURE is never asked for: passwords (VNC/SPICE) are left
// out, so none ends up in a repository or a log.
func (p *Provider) DomainXML(ctx context.Context, inactive bool) (string, error) {
	l, dom := p.l, p.dom
	if l == nil {
		return "", fmt.Errorf("domain XML: call Identify first: %w", errs.ErrUsage)
	}
	var flags golibvirt.DomainXMLFlags
	if inactive {
		flags |= golibvirt.DomainXMLInactive
	}
	x, err := call(ctx, func() (string, error) { return l.DomainGetXMLDesc(dom, flags) })
	if err != nil {
		return "", fmt.Errorf("domain %s: get XML: %w", dom.Name, classify(err))
	}
	return x, nil
}

// CheckpointXML returns a checkpoint's definition (virDomainCheckpointGetXMLDesc,
// with the domain definition it was taken with) for storage with the backup
// that created it. The change-tracking seam keeps it so that, when libvirt
// has lost the checkpoint's metadata (the domain was undefined and defined
// again, or moved host) while QEMU still holds its bitmaps, the next backup
// can put it back with RedefineCheckpoint instead of failing with "Bitmap
// already exists" or reading everything. A missing checkpoint gives
// errs.ErrNotFound.
func (p *Provider) CheckpointXML(ctx context.Context, name string) (string, error) {
	l, dom := p.l, p.dom
	if l == nil {
		return "", fmt.Errorf("checkpoint XML: call Identify first: %w", errs.ErrUsage)
	}
	cp, err := call(ctx, func() (golibvirt.DomainCheckpoint, error) { return l.DomainCheckpointLookupByName(dom, name, 0) })
	if err != nil {
		return "", fmt.Errorf("domain %s: checkpoint %s: %w", dom.Name, name, classify(err))
	}
	x, err := call(ctx, func() (string, error) { return l.DomainCheckpointGetXMLDesc(cp, 0) })
	if err != nil {
		return "", fmt.Errorf("domain %s: checkpoint %s: get XML: %w", dom.Name, name, classify(err))
	}
	return x, nil
}

// RedefineCheckpoint puts back a checkpoint's metadata from the XML that
// CheckpointXML returned (virDomainCheckpointCreateXML with REDEFINE and
// REDEFINE_VALIDATE: libvirt checks that every disk still has the
// checkpoint's bitmap). Redefine a chain parents first. A checkpoint whose
// bitmaps are gone fails with errs.ErrNotFound: the next backup must then
// read in full. The seam calls it in Prepare's place, before the set, when
// Checkpoint.Incremental is missing from Checkpoints.
func (p *Provider) RedefineCheckpoint(ctx context.Context, xml string) error {
	l, dom := p.l, p.dom
	if l == nil {
		return fmt.Errorf("redefine checkpoint: call Identify first: %w", errs.ErrUsage)
	}
	flags := uint32(golibvirt.DomainCheckpointCreateRedefine | golibvirt.DomainCheckpointCreateRedefineValidate)
	_, err := call(ctx, func() (golibvirt.DomainCheckpoint, error) { return l.DomainCheckpointCreateXML(dom, xml, flags) })
	if err != nil {
		if isCode(err, golibvirt.ErrCheckpointInconsistent) || isCode(err, golibvirt.ErrInvalidDomainCheckpoint) {
			return fmt.Errorf("domain %s: redefine checkpoint: the disks no longer hold its bitmaps: %v: %w", dom.Name, err, errs.ErrNotFound)
		}
		return fmt.Errorf("domain %s: redefine checkpoint: %w", dom.Name, classify(err))
	}
	return nil
}
