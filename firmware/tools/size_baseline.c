/* The empty program size_probe.c is measured against. */
int main(void)
{
    return 0;
}
