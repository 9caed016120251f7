// SPDX-License-Identifier: GPL-2.0
/*
 * klp-convert: gives a kbuild-built livepatch module the klp relocations
 * Documentation/livepatch/module-elf-format.rst describes, for the symbols
 * it already names `.klp.sym.<object>.<name>,<sympos>` (build-livepatch
 * renames them with objcopy --redefine-sym; klp-convert and kpatch-build
 * emit the same form):
 *
 *  - each such symbol gets st_shndx = SHN_LIVEPATCH (0xff20), so the
 *    module loader leaves it to klp;
 *  - every relocation against one, in a relocation section of a loaded
 *    section S, moves out of .rela<S> into `.klp.rela.<object>.<S>`
 *    (SHT_RELA, same symbol table and target, flags "AIo": SHF_ALLOC so
 *    the kernel's module loader keeps it until <object> loads,
 *    SHF_INFO_LINK, SHF_RELA_LIVEPATCH), which klp applies when it patches
 *    <object>: at once for vmlinux or a loaded module, when the module
 *    loads for one that is not (klp_module_coming). Other relocations stay
 *    where they were.
 *
 * The symbol table (its order: relocations name symbols by index) and
 * every section but the split relocation sections are unchanged;
 * the new relocation sections, a longer copy of .shstrtab and the new
 * section header table are appended to the file.
 *
 * Usage: klp-convert IN.ko OUT.ko
 * Prints one line per new section on stderr. Fails when IN has no
 * `.klp.sym` symbol or no relocation against one.
 */
#include <elf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SHF_RELA_LIVEPATCH 0x00100000
#define SHN_LIVEPATCH 0xff20
#define KLP_SYM ".klp.sym."

static const char *prog = "klp-convert";

static void die(const char *fmt, const char *arg)
{
	fprintf(stderr, "%s: ", prog);
	fprintf(stderr, fmt, arg);
	fputc('\n', stderr);
	exit(1);
}

struct buf {
	unsigned char *p;
	size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n)
			cap *= 2;
		b->p = realloc(b->p, cap);
		if (!b->p)
			die("%s", "out of memory");
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void pad8(struct buf *b, size_t base)
{
	static const unsigned char zero[8];

	put(b, zero, (8 - (base + b->len) % 8) % 8);
}

/* Within [0, size): the n bytes at off. */
static int inside(uint64_t off, uint64_t n, uint64_t size)
{
	return off <= size && n <= size - off;
}

/* The object of a `.klp.sym.<object>.<name>,<sympos>` name (its length in
 * *len), or NULL if the name is not one. */
static const char *klp_object(const char *name, size_t *len)
{
	const char *obj, *dot, *comma, *d;

	if (strncmp(name, KLP_SYM, strlen(KLP_SYM)) != 0)
		return NULL;
	obj = name + strlen(KLP_SYM);
	dot = strchr(obj, '.');
	comma = strrchr(obj, ',');
	if (!dot || dot == obj || !comma || comma < dot + 2 || !comma[1])
		die("malformed klp symbol `%s` (expected .klp.sym.<object>.<name>,<sympos>)", name);
	for (d = comma + 1; *d; d++)
		if (*d < '0' || *d > '9')
			die("malformed klp symbol `%s` (sympos is not a number)", name);
	*len = (size_t)(dot - obj);
	return obj;
}

int main(int argc, char **argv)
{
	FILE *f;
	unsigned char *in;
	long size;
	Elf64_Ehdr eh;
	Elf64_Shdr *sh;
	size_t shnum, i, j, symtab = 0, nsyms, converted = 0, moved = 0;
	const char *strtab, *shstr;
	uint64_t strsize, shstrsize;
	const char **sym_obj;
	size_t *sym_objlen;
	struct buf tail = { 0 }, names = { 0 };
	size_t nnew = 0;
	Elf64_Shdr *newsh = NULL;

	if (argc != 3) {
		fprintf(stderr, "usage: %s IN.ko OUT.ko\n", prog);
		return 2;
	}
	f = fopen(argv[1], "rb");
	if (!f)
		die("cannot open %s", argv[1]);
	if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
		die("cannot read %s", argv[1]);
	in = malloc((size_t)size + 1);
	if (!in || fread(in, 1, (size_t)size, f) != (size_t)size)
		die("cannot read %s", argv[1]);
	fclose(f);

	if ((size_t)size < sizeof(eh))
		die("%s: not an ELF file", argv[1]);
	memcpy(&eh, in, sizeof(eh));
	if (memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh.e_ident[EI_DATA] != ELFDATA2LSB || eh.e_type != ET_REL || eh.e_machine != EM_X86_64)
		die("%s: not an x86-64 relocatable ELF64 (a .ko)", argv[1]);
	shnum = eh.e_shnum;
	if (eh.e_shentsize != sizeof(Elf64_Shdr) || shnum == 0 || eh.e_shstrndx >= shnum ||
	    !inside(eh.e_shoff, (uint64_t)shnum * sizeof(Elf64_Shdr), (uint64_t)size))
		die("%s: unexpected section header table", argv[1]);
	sh = calloc(shnum, sizeof(*sh));
	if (!sh)
		die("%s", "out of memory");
	memcpy(sh, in + eh.e_shoff, shnum * sizeof(*sh));
	for (i = 0; i < shnum; i++) {
		if (sh[i].sh_type != SHT_NOBITS && !inside(sh[i].sh_offset, sh[i].sh_size, (uint64_t)size))
			die("%s: a section lies outside the file", argv[1]);
		if (sh[i].sh_type == SHT_SYMTAB) {
			if (symtab)
				die("%s: more than one symbol table", argv[1]);
			symtab = i;
		}
	}
	if (!symtab || sh[symtab].sh_entsize != sizeof(Elf64_Sym) || sh[symtab].sh_link >= shnum)
		die("%s: no usable symbol table", argv[1]);
	strtab = (const char *)in + sh[sh[symtab].sh_link].sh_offset;
	strsize = sh[sh[symtab].sh_link].sh_size;
	shstr = (const char *)in + sh[eh.e_shstrndx].sh_offset;
	shstrsize = sh[eh.e_shstrndx].sh_size;
	if (!strsize || strtab[strsize - 1] || !shstrsize || shstr[shstrsize - 1])
		die("%s: string table not NUL-terminated", argv[1]);

	/* The klp symbols: SHN_LIVEPATCH, and which object each names. */
	nsyms = sh[symtab].sh_size / sizeof(Elf64_Sym);
	sym_obj = calloc(nsyms, sizeof(*sym_obj));
	sym_objlen = calloc(nsyms, sizeof(*sym_objlen));
	if (!sym_obj || !sym_objlen)
		die("%s", "out of memory");
	for (i = 1; i < nsyms; i++) {
		Elf64_Sym s;
		unsigned char *at = in + sh[symtab].sh_offset + i * sizeof(s);

		memcpy(&s, at, sizeof(s));
		if (s.st_name >= strsize)
			die("%s: symbol name outside the string table", argv[1]);
		sym_obj[i] = klp_object(strtab + s.st_name, &sym_objlen[i]);
		if (!sym_obj[i])
			continue;
		if (s.st_shndx != SHN_UNDEF && s.st_shndx != SHN_LIVEPATCH)
			die("klp symbol `%s` is defined in the module; it must be undefined",
			    strtab + s.st_name);
		s.st_shndx = SHN_LIVEPATCH;
		memcpy(at, &s, sizeof(s));
		converted++;
	}
	if (!converted)
		die("%s: no .klp.sym symbol to convert", argv[1]);

	/* Split each relocation section of a loaded section: relocations
	 * against a klp symbol go to .klp.rela.<object>.<target>, one section
	 * per object, in the order the objects first appear. */
	put(&names, shstr, shstrsize);
	for (i = 0; i < shnum; i++) {
		Elf64_Rela *r;
		size_t n, kept = 0, first;
		const char *target;

		if (sh[i].sh_type != SHT_RELA || sh[i].sh_link != symtab ||
		    (sh[i].sh_flags & SHF_RELA_LIVEPATCH))
			continue;
		if (sh[i].sh_info >= shnum || sh[i].sh_entsize != sizeof(Elf64_Rela))
			die("%s: unexpected relocation section", argv[1]);
		if (!(sh[sh[i].sh_info].sh_flags & SHF_ALLOC))
			continue; /* debug information */
		if (sh[sh[i].sh_info].sh_name >= shstrsize)
			die("%s: section name outside .shstrtab", argv[1]);
		target = shstr + sh[sh[i].sh_info].sh_name;
		n = sh[i].sh_size / sizeof(Elf64_Rela);
		r = malloc(n * sizeof(*r) + 1);
		if (!r)
			die("%s", "out of memory");
		memcpy(r, in + sh[i].sh_offset, n * sizeof(*r));
		first = nnew;
		for (j = 0; j < n; j++) {
			size_t sym = ELF64_R_SYM(r[j].r_info), k;
			const char *obj;
			size_t len;

			if (sym >= nsyms)
				die("%s: relocation against a symbol that does not exist", argv[1]);
			if (!sym_obj[sym]) {
				r[kept++] = r[j];
				continue;
			}
			obj = sym_obj[sym];
			len = sym_objlen[sym];
			/* This object's new section for this target, or a new one. */
			for (k = first; k < nnew; k++) {
				const char *name = (const char *)names.p + newsh[k].sh_name +
						   strlen(".klp.rela.");
				if (strncmp(name, obj, len) == 0 && name[len] == '.')
					break;
			}
			if (k == nnew) {
				Elf64_Shdr ns = { 0 };

				newsh = realloc(newsh, (nnew + 1) * sizeof(*newsh));
				if (!newsh)
					die("%s", "out of memory");
				ns.sh_name = (Elf64_Word)names.len;
				put(&names, ".klp.rela.", strlen(".klp.rela."));
				put(&names, obj, len);
				put(&names, ".", 1);
				put(&names, target, strlen(target) + 1);
				ns.sh_type = SHT_RELA;
				ns.sh_flags = SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH;
				ns.sh_link = (Elf64_Word)symtab;
				ns.sh_info = sh[i].sh_info;
				ns.sh_addralign = 8;
				ns.sh_entsize = sizeof(Elf64_Rela);
				/* sh_offset/sh_size: the relocations, gathered below. */
				newsh[nnew++] = ns;
			}
		}
		/* Gather each new section's relocations, in their old order. */
		for (size_t k = first; k < nnew; k++) {
			const char *name = (const char *)names.p + newsh[k].sh_name + strlen(".klp.rela.");

			pad8(&tail, 0);
			newsh[k].sh_offset = tail.len; /* relative to the tail, fixed below */
			for (j = 0; j < n; j++) {
				Elf64_Rela one;
				size_t sym;

				memcpy(&one, in + sh[i].sh_offset + j * sizeof(one), sizeof(one));
				sym = ELF64_R_SYM(one.r_info);
				if (sym_obj[sym] && strncmp(name, sym_obj[sym], sym_objlen[sym]) == 0 &&
				    name[sym_objlen[sym]] == '.') {
					put(&tail, &one, sizeof(one));
					moved++;
				}
			}
			newsh[k].sh_size = tail.len - newsh[k].sh_offset;
			fprintf(stderr, "%s: %s: %zu relocation(s) from %s\n", prog,
				(const char *)names.p + newsh[k].sh_name,
				(size_t)(newsh[k].sh_size / sizeof(Elf64_Rela)), shstr + sh[i].sh_name);
		}
		/* What stays, in place; the rest of the old section is zeroed. */
		memset(in + sh[i].sh_offset, 0, n * sizeof(*r));
		memcpy(in + sh[i].sh_offset, r, kept * sizeof(*r));
		sh[i].sh_size = kept * sizeof(*r);
		free(r);
	}
	if (!moved)
		die("%s: no relocation refers to a .klp.sym symbol", argv[1]);

	/* The output: the file as modified, the new relocations, the new
	 * .shstrtab, the new section header table. */
	{
		size_t base = (size_t)size, rela_at, names_at, shdr_at, total;
		struct buf out = { 0 };
		FILE *o;

		base += (8 - base % 8) % 8;
		rela_at = base;
		names_at = rela_at + tail.len;
		shdr_at = names_at + names.len;
		shdr_at += (8 - shdr_at % 8) % 8;
		for (i = 0; i < nnew; i++)
			newsh[i].sh_offset += rela_at;
		sh[eh.e_shstrndx].sh_offset = names_at;
		sh[eh.e_shstrndx].sh_size = names.len;
		if (shnum + nnew >= SHN_LORESERVE)
			die("%s: too many sections", argv[1]);
		eh.e_shoff = shdr_at;
		eh.e_shnum = (Elf64_Half)(shnum + nnew);
		memcpy(in, &eh, sizeof(eh));
		put(&out, in, (size_t)size);
		pad8(&out, 0);
		put(&out, tail.p, tail.len);
		put(&out, names.p, names.len);
		pad8(&out, 0);
		if (out.len != shdr_at)
			die("%s", "internal error: layout");
		put(&out, sh, shnum * sizeof(*sh));
		put(&out, newsh, nnew * sizeof(*newsh));
		total = out.len;
		o = fopen(argv[2], "wb");
		if (!o || fwrite(out.p, 1, total, o) != total || fclose(o) != 0)
			die("cannot write %s", argv[2]);
	}
	fprintf(stderr, "%s: %zu klp symbol(s), %zu relocation(s) moved into %zu .klp.rela section(s)\n",
		prog, converted, moved, nnew);
	return 0;
}
