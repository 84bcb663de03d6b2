// Both APIs' /docs/ pages in headless Chromium (Debian's `chromium`, driven by playwright-core):
// each page lists every operation of its document, and a "Try it out" call made from the page,
// with the bearer token set through "Authorize", is answered 200 in the page. A screenshot of a
// page that fails goes to CANOPY_DOCS_SCREENSHOTS.
import { chromium, type Page } from "playwright-core";

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

interface Check {
  name: string;
  base: string;
  /** The operation tried out: its Swagger UI block id is `operations-<tag>-<operationId>`. */
  tag: string;
  operationId: string;
  /** Whether the operation takes the bearer token (Authorize applies to secured operations only). */
  secured: boolean;
}

const METHODS = new Set(["get", "put", "post", "delete", "patch", "options", "head", "trace"]);

async function documentedOperations(base: string): Promise<number> {
  const response = await fetch(`${base}/openapi.json`);
  const document = (await response.json()) as { paths: Record<string, Record<string, unknown>> };
  return Object.values(document.paths).reduce(
    (count, item) => count + Object.keys(item).filter((method) => METHODS.has(method)).length,
    0,
  );
}

async function check(page: Page, { name, base, tag, operationId, secured }: Check, token: string): Promise<void> {
  const expected = await documentedOperations(base);
  await page.goto(`${base}/docs/`);
  await page.waitForSelector(".opblock", { timeout: 30_000 });
  const listed = await page.locator(".opblock").count();
  if (listed !== expected) throw new Error(`${name}: the page lists ${listed} operations, the document has ${expected}`);
  const missing = await page.getByText("No API definition provided.").count();
  if (missing > 0) throw new Error(`${name}: the page says "No API definition provided."`);
  console.log(`${name}: /docs/ lists all ${listed} operations`);

  // Authorize with the bearer token, as a person does.
  await page.locator(".auth-wrapper .authorize").first().click();
  const modal = page.locator(".modal-ux");
  await modal.locator("input").first().fill(token);
  await modal.locator("button.authorize").first().click();
  await modal.locator("button.btn-done, button.close-modal").first().click();

  const block = page.locator(`#operations-${tag}-${operationId}`);
  await block.locator(".opblock-summary").first().click();
  await block.locator("button.try-out__btn").click();
  // Swagger UI fills each parameter with its documented example; a cursor or a consistency token
  // of another stack is not one to send, so the optional parameters are emptied, as a person
  // listing sessions would.
  const inputs = block.locator(".parameters input[type=text]");
  for (let i = 0, n = await inputs.count(); i < n; i++) await inputs.nth(i).fill("");
  await block.locator("button.execute").click();
  const status = block.locator(".live-responses-table .response .response-col_status").first();
  await status.waitFor({ timeout: 30_000 });
  const answered = (await status.innerText()).trim();
  if (!answered.startsWith("200")) throw new Error(`${name}: "Try it out" on ${operationId} answered ${answered}`);
  const curl = await block.locator(".curl-command, .curl").first().innerText();
  if (secured && !curl.includes(`Bearer ${token}`)) {
    throw new Error(`${name}: the call did not carry the token set in Authorize`);
  }
  console.log(`${name}: "Try it out" on ${operationId} answered 200${secured ? " with the token set in Authorize" : ""}`);
}

async function main(): Promise<void> {
  const token = env("CANOPY_DOCS_TOKEN");
  const screenshots = env("CANOPY_DOCS_SCREENSHOTS");
  const root = typeof process.getuid === "function" && process.getuid() === 0;
  const browser = await chromium.launch({
    executablePath: process.env["CANOPY_CHROMIUM"] ?? "/usr/bin/chromium",
    // Chromium refuses to run as root inside its own sandbox.
    args: root ? ["--no-sandbox"] : [],
  });
  const checks: Check[] = [
    { name: "command-api", base: env("CANOPY_COMMAND_API_URL"), tag: "ops", operationId: "readyz", secured: false },
    { name: "query-api", base: env("CANOPY_QUERY_API_URL"), tag: "sessions", operationId: "list_sessions", secured: true },
  ];
  let failed = false;
  for (const item of checks) {
    const page = await browser.newPage();
    try {
      await check(page, item, token);
    } catch (error) {
      failed = true;
      const file = `${screenshots}/docs-${item.name}.png`;
      await page.screenshot({ path: file, fullPage: true }).catch(() => undefined);
      console.error(`${item.name}: ${String(error)} (screenshot: ${file})`);
    } finally {
      await page.close();
    }
  }
  await browser.close();
  process.exit(failed ? 1 : 0);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
