// A line diff (longest common subsequence) laid out side by side.

export interface Row {
  left: string | null;
  right: string | null;
  kind: "same" | "removed" | "added" | "changed";
}

export function sideBySide(before: string, after: string): Row[] {
  const a = before.split("\n");
  const b = after.split("\n");
  // LCS table; configs are small (thousands of lines at most).
  const lcs: number[][] = Array.from({ length: a.length + 1 }, () => new Array(b.length + 1).fill(0));
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const rows: Row[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) {
      rows.push({ left: a[i++], right: b[j++], kind: "same" });
    } else if (j < b.length && (i >= a.length || lcs[i][j + 1] >= lcs[i + 1][j])) {
      rows.push({ left: null, right: b[j++], kind: "added" });
    } else {
      rows.push({ left: a[i++], right: null, kind: "removed" });
    }
  }
  // A removal followed by an addition reads best as one changed line.
  const merged: Row[] = [];
  for (const row of rows) {
    const prev = merged[merged.length - 1];
    if (row.kind === "added" && prev && prev.kind === "removed" && prev.right === null) {
      prev.right = row.right;
      prev.kind = "changed";
    } else {
      merged.push({ ...row });
    }
  }
  return merged;
}
